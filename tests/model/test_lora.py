"""LoRA layers on a tiny diffusers PixArt transformer: exactness, merging, dtypes, files, PEFT interop."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from pixcell_ext.model.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    unmerge_lora,
)
from pixcell_ext.model.lora_files import DamagedFileError, LoRAMismatchError, load_lora, read_lora_config, save_lora
from pixcell_ext.model.lora_targets import DEFAULT_TARGET_MODULES, OPTIONAL_TARGET_MODULES, parse_block_spec

NUM_BLOCKS = 3


def build_model(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=NUM_BLOCKS,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
        interpolation_scale=1,
    )
    return model.float().eval()


@pytest.fixture
def model() -> PixArtTransformer2DModel:
    return build_model()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 1, 12, generator=g),
        "timestep": torch.tensor([3, 700]),
    }


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return model(
        inputs["hidden_states"].to(dtype),
        encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
        timestep=inputs["timestep"],
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample


def perturb(model: torch.nn.Module, seed: int = 2) -> None:
    """Fresh LoRA has B = 0; random B makes every layer contribute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def expected_names(blocks, targets=DEFAULT_TARGET_MODULES) -> list[str]:
    return sorted(f"transformer_blocks.{b}.{t}" for b in blocks for t in targets)


# --- exactness, merge --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_injection_leaves_output_exactly_unchanged(model, inputs):
    before = run(model, inputs)
    names = inject_lora(model, LoRAConfig(rank=4))
    assert names == expected_names(range(NUM_BLOCKS))
    assert torch.equal(run(model, inputs), before)


@torch.no_grad()
def test_merge_unmerge_exact(model, inputs):
    base_out = run(model, inputs)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0))
    layers = lora_layers(model)
    saved = {name: layer.base_layer.weight.clone() for name, layer in layers.items()}
    perturb(model)

    unmerged = run(model, inputs)
    assert (unmerged - base_out).abs().max() > 1e-3
    for name, layer in layers.items():  # the unmerged forward never writes to the base weight
        assert torch.equal(layer.base_layer.weight, saved[name])

    merge_lora(model)
    merged_weights = {name: layer.base_layer.weight.clone() for name, layer in layers.items()}
    merge_lora(model)  # documented no-op
    assert all(torch.equal(layers[n].base_layer.weight, w) for n, w in merged_weights.items())
    assert all(layer.merged for layer in layers.values())
    merged = run(model, inputs)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)

    unmerge_lora(model)
    unmerge_lora(model)  # documented no-op
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, saved[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=0)


def test_merged_delta_is_scaling_times_b_a():
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=2, alpha=3.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    expected = w0 + 1.5 * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected)


# --- gradients and dtypes ----------------------------------------------------------------------------------------


def test_only_lora_parameters_train(model, inputs):
    inject_lora(model, LoRAConfig(rank=4))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(model)}
    assert len(trainable) == 2 * len(DEFAULT_TARGET_MODULES) * NUM_BLOCKS
    perturb(model)
    run(model, inputs).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


@pytest.mark.parametrize("cast_first", [True, False], ids=["cast-then-inject", "inject-then-cast"])
def test_lora_stays_fp32_in_bf16_model(model, inputs, cast_first):
    if cast_first:
        model.to(torch.bfloat16)
    inject_lora(model, LoRAConfig(rank=4))
    if not cast_first:
        model.to(torch.bfloat16)
    layer = lora_layers(model)["transformer_blocks.0.attn1.to_q"]
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    perturb(model)
    out = run(model, inputs, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert layer.lora_B.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_into_half_precision_weights_is_refused(dtype):
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=2, alpha=2.0).to(dtype)
    torch.nn.init.normal_(layer.lora_B.weight)
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match=rf"{dtype}.*unmerged"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def small_update_layer(width: int = 256, rank: int = 8, weight_std: float = 0.02) -> LoRALinear:
    """PixCell-like magnitudes: weights of std 0.02 and a LoRA update of RMS 7e-5 (0.35 % of the weights)."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(width, width)
    layer = LoRALinear(base, rank, float(rank))
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) * weight_std)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
        layer.lora_B.weight.mul_(weight_std * 0.0035 / layer.delta_weight().square().mean().sqrt())
    return layer


def effective_update(outputs: torch.Tensor, base_outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight change a layer applies, fitted by least squares over many tokens (averages output rounding out)."""
    return torch.linalg.lstsq(x.float(), (outputs - base_outputs).float()).solution.T


@torch.no_grad()
def test_small_lora_update_survives_in_bf16_unmerged_where_a_bf16_merge_erases_it():
    layer = small_update_layer().to(torch.bfloat16)
    delta = layer.delta_weight()
    x = torch.randn(8192, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    base = layer.base_layer(x)

    kept = effective_update(layer(x), base, x)
    assert (kept - delta).norm() / delta.norm() < 0.2

    # What merging did before it was refused: W + ΔW rounded to bf16. Most weights do not move at all.
    merged_weight = (layer.base_layer.weight.float() + delta).bfloat16()
    assert (merged_weight == layer.base_layer.weight).float().mean() > 0.3
    rounded = effective_update(torch.nn.functional.linear(x, merged_weight, layer.base_layer.bias), base, x)
    assert (rounded - delta).norm() / delta.norm() > 0.3


class FloatCopies(TorchDispatchMode):
    """Records the shapes of every fp32 tensor made by a dtype conversion while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32:
            self.shapes.append(tuple(out.shape))
        return out


def test_autocast_forward_makes_no_fp32_copy_of_the_input_and_keeps_results_and_gradients():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(32, 24), rank=4, alpha=8.0).to(torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B.weight)
    reference = copy.deepcopy(layer)
    x = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)
    grad = torch.randn(16, 24, dtype=torch.bfloat16)

    with torch.autocast("cpu", dtype=torch.bfloat16), FloatCopies() as copies:
        out = layer(x)
    assert (16, 32) not in copies.shapes  # no fp32 copy of the activations
    out.backward(grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the previous forward: input cast to fp32 A's dtype first
        lora = reference.lora_B(reference.lora_A(x_reference.float()))
        expected = reference.base_layer(x_reference).add_(lora, alpha=reference.scaling)
    expected.backward(grad)

    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert torch.equal(x.grad, x_reference.grad)
    for ours, theirs in ((layer.lora_A, reference.lora_A), (layer.lora_B, reference.lora_B)):
        assert ours.weight.dtype == ours.weight.grad.dtype == torch.float32  # fp32 master weights and gradients
        assert ours.weight.grad.abs().sum() > 0 and torch.equal(ours.weight.grad, theirs.weight.grad)


def test_diffusers_qkv_fusion_fails_loudly_instead_of_dropping_lora(model):
    # fuse_qkv_projections concatenates `to_q.weight` etc.; the wrapper exposes no `weight`, so LoRA cannot be
    # silently fused away.
    inject_lora(model, LoRAConfig(rank=4))
    with pytest.raises(AttributeError, match="weight"):
        model.fuse_qkv_projections()


# --- files -------------------------------------------------------------------------------------------------------


def test_save_load_roundtrip(model, inputs, tmp_path):
    config = LoRAConfig(rank=4, alpha=8.0, blocks=(0, 2), rank_pattern={r"transformer_blocks\.2\..*": 2})
    inject_lora(model, config)
    perturb(model)
    path = save_lora(model, config, tmp_path / "adapter.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temp file left behind

    keys = set(load_file(path))
    names = expected_names((0, 2))
    assert keys == {f"transformer.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    # The file is portable at alpha = r: the scaling (8/4) is in lora_B, the trained alpha in our own entry.
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 4
    assert meta["transformer.alpha_pattern"] == {r"transformer_blocks\.2\..*": 2}
    assert meta["pixcell_ext.config"]["alpha"] == 8.0 and meta["pixcell_ext.lora_format"] == 2
    assert meta["transformer.target_modules"] == names
    assert read_lora_config(path) == config
    layer = lora_layers(model)["transformer_blocks.0.attn1.to_q"]
    stored_b = load_file(path)["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    assert torch.equal(stored_b, layer.lora_B.weight.detach() * 2)

    fresh = build_model()
    assert load_lora(fresh, path) == config
    assert sorted(lora_layers(fresh)) == names
    assert torch.equal(lora_layers(fresh)["transformer_blocks.0.attn1.to_q"].lora_B.weight, layer.lora_B.weight)
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), run(model, inputs))


def test_save_refuses_a_config_that_does_not_describe_the_model(model, tmp_path):
    inject_lora(model, LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="rank 4.*config rank 8"):
        save_lora(model, LoRAConfig(rank=8), tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def saved(model, tmp_path):
    config = LoRAConfig(rank=4)
    inject_lora(model, config)
    perturb(model)
    return save_lora(model, config, tmp_path / "adapter.safetensors")


def test_load_other_rank_reports_shapes(saved):
    other = build_model()
    inject_lora(other, LoRAConfig(rank=8, alpha=32.0))
    with pytest.raises(LoRAMismatchError) as err:
        load_lora(other, saved)
    msg = str(err.value)
    assert str(saved) in msg and "shape mismatches (36)" in msg
    assert "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight: file [4, 16] vs model [8, 16]" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_load_other_targets_reports_missing_and_unexpected(saved):
    other = build_model()
    inject_lora(other, LoRAConfig(rank=4, target_modules=("attn1.to_q", "ff.net.2")))
    with pytest.raises(LoRAMismatchError) as err:
        load_lora(other, saved)
    msg = str(err.value)
    assert "missing keys (6)" in msg and "transformer.transformer_blocks.0.ff.net.2.lora_A.weight" in msg
    assert "unexpected keys (30)" in msg and "transformer.transformer_blocks.0.attn2.to_v.lora_B.weight" in msg
    assert "+20 more" in msg  # long lists are truncated, with the count


def test_load_file_with_removed_key(saved, tmp_path, inputs):
    tensors = load_file(saved)
    with safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
    removed = "transformer.transformer_blocks.1.attn2.to_v.lora_B.weight"
    del tensors[removed]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    fresh = build_model()
    with torch.no_grad():
        before = run(fresh, inputs)
    with pytest.raises(LoRAMismatchError, match=rf"missing keys \(1\): {removed}"):
        load_lora(fresh, broken)
    assert not lora_layers(fresh)  # all-or-nothing: the failed load did not inject anything
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), before)


def test_truncated_file_is_reported_as_damaged_and_nothing_loads(saved, tmp_path, inputs):
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for length in (6, len(data) // 2, len(data) - 1):  # inside the header, inside the tensors, the last byte
        cut.write_bytes(data[:length])
        fresh = build_model()
        with pytest.raises(DamagedFileError, match=rf"'{cut}' is damaged or incomplete.*copy it again"):
            load_lora(fresh, cut)
        assert not lora_layers(fresh)


def test_load_other_alpha_reports_scaling(saved):
    other = build_model()
    inject_lora(other, LoRAConfig(rank=4, alpha=32.0))
    with pytest.raises(LoRAMismatchError, match=r"scaling mismatches \(18\).*file 4 vs model 8"):
        load_lora(other, saved)


def test_load_into_merged_model_raises(model, saved):
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        load_lora(model, saved)


def test_read_config_without_metadata_names_the_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=r"plain\.safetensors.*lora_adapter_metadata"):
        read_lora_config(path)


# --- PEFT interop ------------------------------------------------------------------------------------------------


PORTABILITY_CASES = {
    "alpha-ne-rank": LoRAConfig(rank=4, alpha=6.0),
    "rslora": LoRAConfig(rank=4, alpha=6.0, use_rslora=True),
    "per-block-ranks": LoRAConfig(
        rank=4, alpha=6.0, blocks=(0, 2), rank_pattern={r"transformer_blocks\.2\.attn1\..*": 2}, use_rslora=True
    ),
}


def randomize(model: torch.nn.Module, seed: int = 3) -> None:
    """Random A and B, so no layer's scaling could hide behind a zero or an initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for w in (layer.lora_A.weight, layer.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def peft_model_from(state: dict[str, torch.Tensor], peft_kwargs: dict):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    peft_model = inject_adapter_in_model(LoraConfig(**peft_kwargs), build_model())
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    result = set_peft_model_state_dict(peft_model, state)
    assert result.unexpected_keys == []
    return peft_model


@pytest.mark.parametrize("case", list(PORTABILITY_CASES))
def test_peft_loads_our_file_identically(model, inputs, tmp_path, case):
    """With or without our metadata: PEFT from the file's entries, and PEFT from tensor shapes alone (alpha = r)."""
    config = PORTABILITY_CASES[case]
    inject_lora(model, config)
    randomize(model)
    path = save_lora(model, config, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        ours = run(model, inputs)
        assert (ours - run(build_model(), inputs)).abs().max() > 1e-2
    state = load_file(path)

    # 1. The way diffusers does with metadata: from the "transformer."-prefixed entries.
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    from_metadata = peft_model_from(
        state, {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    )

    # 2. A loader that sees only tensors: ranks from the lora_A shapes, alpha = r for every module (scale 1).
    ranks = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): v.shape[0]
        for k, v in state.items()
        if k.endswith(".lora_A.weight")
    }
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    from_shapes = peft_model_from(
        state,
        {
            "r": default_rank,
            "lora_alpha": default_rank,
            "target_modules": sorted(ranks),
            "rank_pattern": {n: r for n, r in ranks.items() if r != default_rank},
            "alpha_pattern": {n: r for n, r in ranks.items() if r != default_rank},
        },
    )
    if case == "per-block-ranks":
        assert from_shapes.transformer_blocks[2].attn1.to_q.lora_A["default"].weight.shape == (2, 16)
        assert from_shapes.transformer_blocks[2].attn1.to_q.scaling["default"] == 1.0

    # 3. diffusers' own fallback for a file without metadata (`load_lora_adapter` builds its ranks this way).
    from diffusers.utils.peft_utils import get_peft_kwargs

    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    diffusers_ranks = {f"^{k}": v.shape[1] for k, v in bare.items() if "lora_B" in k}
    from_diffusers = peft_model_from(state, get_peft_kwargs(diffusers_ranks, None, bare, is_unet=False))

    with torch.no_grad():
        torch.testing.assert_close(run(from_metadata, inputs), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(run(from_shapes, inputs), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(run(from_diffusers, inputs), ours, atol=1e-5, rtol=0)

    # And back: our loader divides the scaling out again, to one fp32 rounding of the trained B.
    fresh = build_model()
    load_lora(fresh, path)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(lora_layers(fresh)[name].lora_B.weight, layer.lora_B.weight, atol=0, rtol=2e-7)
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, inputs), ours, atol=1e-6, rtol=0)


FORMAT1_FILE = Path(__file__).parents[1] / "data" / "lora_format1_rank4_alpha6.safetensors"


def test_format1_file_still_loads_with_its_scaling(inputs):
    """Written by save_lora before B carried the scaling: raw B, alpha 6 at rank 4 (2 in block 2's attn1)."""
    with safe_open(str(FORMAT1_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert "pixcell_ext.lora_format" not in meta and meta["transformer.lora_alpha"] == 6.0

    loaded = build_model()
    config = load_lora(loaded, FORMAT1_FILE)
    assert config.alpha == 6.0 and lora_layers(loaded)["transformer_blocks.2.attn1.to_q"].scaling == 3.0

    # Reference: the same layers with the file's raw tensors copied in, i.e. scaling applied at run time.
    reference = build_model()
    inject_lora(reference, config)
    raw = load_file(FORMAT1_FILE)
    with torch.no_grad():
        for name, layer in lora_layers(reference).items():
            layer.lora_A.weight.copy_(raw[f"transformer.{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(raw[f"transformer.{name}.lora_B.weight"])
        expected = run(reference, inputs)
        assert (expected - run(build_model(), inputs)).abs().max() > 1e-3
        assert torch.equal(run(loaded, inputs), expected)


# --- selection and config ----------------------------------------------------------------------------------------


def test_block_selection_and_rank_pattern(model):
    targets = DEFAULT_TARGET_MODULES + OPTIONAL_TARGET_MODULES
    config = LoRAConfig(
        rank=8,
        target_modules=targets,
        blocks=(0, 2),
        rank_pattern={r"transformer_blocks\.2\..*": 2, r"ff\.net\.2": 3, r"net\.0": 5},
    )
    names = inject_lora(model, config)
    assert names == expected_names((0, 2), targets)
    assert not any(".1." in n for n in lora_layers(model))
    assert isinstance(model.transformer_blocks[1].attn1.to_q, torch.nn.Linear)
    ranks = {name: layer.rank for name, layer in lora_layers(model).items()}
    assert ranks["transformer_blocks.0.attn1.to_q"] == 8
    assert ranks["transformer_blocks.0.ff.net.2"] == 3  # a pattern may match a dotted suffix, as in PEFT
    assert ranks["transformer_blocks.0.ff.net.0.proj"] == 8  # ... but only a full trailing part of the name
    assert ranks["transformer_blocks.2.ff.net.2"] == 2  # first match wins
    assert lora_layers(model)["transformer_blocks.2.attn2.to_v"].lora_A.weight.shape == (2, 16)


def test_inject_errors(model):
    with pytest.raises(ValueError, match=r"attn2\.to_z"):
        inject_lora(model, LoRAConfig(target_modules=("attn1.to_q", "attn2.to_z")))
    with pytest.raises(ValueError, match=r"ff\.net\.0 \(GELU, not nn\.Linear\)"):
        inject_lora(model, LoRAConfig(target_modules=("ff.net.0",)))
    with pytest.raises(ValueError, match=r"blocks \[5\] do not exist.*0-2"):
        inject_lora(model, LoRAConfig(blocks=(0, 5)))
    assert not lora_layers(model)  # failed injections changed nothing
    inject_lora(model, LoRAConfig(rank=4))
    with pytest.raises(RuntimeError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(rank=4))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", tuple(range(28))),
        ("0-13", tuple(range(14))),
        ("0-3,10,20-27", (0, 1, 2, 3, 10, *range(20, 28))),
        ("27", (27,)),
        (" 5 - 6 , 1 ", (1, 5, 6)),
    ],
)
def test_parse_block_spec_accepts(spec, expected):
    assert parse_block_spec(spec, 28) == expected


@pytest.mark.parametrize(
    ("spec", "bad_part"), [("0-28", "0-28"), ("3-1", "3-1"), ("1,,2", ""), ("x", "x"), ("-1", "-1"), ("0-3,10-", "10-")]
)
def test_parse_block_spec_rejects(spec, bad_part):
    with pytest.raises(ValueError, match=rf"part '{bad_part}'.*valid blocks are 0-27"):
        parse_block_spec(spec, 28)


def test_rslora_scaling():
    assert LoRAConfig(rank=16, alpha=16.0, use_rslora=True).scaling_for(16) == 4.0
    assert LoRAConfig(rank=16, alpha=16.0).scaling_for(16) == 1.0
    assert LoRAConfig(alpha=8.0, use_rslora=True).scaling_for(2) == pytest.approx(8 / math.sqrt(2))
    layer = LoRALinear(torch.nn.Linear(4, 4), rank=4, alpha=8.0, use_rslora=True)
    assert layer.scaling == 4.0


def test_config_dict_roundtrip_is_json_safe():
    config = LoRAConfig(rank=4, blocks=(0, 3), rank_pattern={"a": 2, "b": 1}, dropout=0.1, use_rslora=True)
    restored = LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and isinstance(restored.blocks, tuple)
    assert list(restored.rank_pattern) == ["a", "b"]  # order matters: first match wins
    with pytest.raises(ValueError, match="unknown LoRAConfig fields"):
        LoRAConfig.from_dict({**config.to_dict(), "bogus": 1})
