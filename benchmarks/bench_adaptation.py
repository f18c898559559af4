"""Does adaptation work, and which parts of it matter? Measured on the trained mini stack and the toy TARGET domain.

First (`source`), the base model on its own SOURCE domain (`stacks.mini_diagnosis`): reference-conditioned class
fidelity by an encoder probe per guidance scale and sampler, against the VAE's ceiling (the probe on round trips of
the references), the unconditional branch alone, how much the condition moves the prediction, and VAE PSNR.
Then, at one fixed training budget (in-process, cached features, the package's loss, randomness, LoRA and sampler):
- base mini PixCell vs adapter only vs LoRA only vs adapter + LoRA: FD/KID in the judge's and in the encoder's
  feature space, precision/recall, against held-out TARGET tiles; beside them, as many independent real TARGET tiles
  (the perfect generator's value at this n) and those tiles passed through the VAE alone (the VAE floor: what a
  generator that matched the real latents exactly would score);
- class fidelity (the judge's accuracy on generated tiles): reference-conditioned; class-only with class
  conditioning; class-only without it (the unconditional fallback);
- the class loss on vs off;
- LoRA placement at an equal trainable-parameter count: early / middle / late blocks (self-attention), and
  self- vs cross-attention targets (all blocks, cross-attention at twice the rank);
- guidance scale 1, 2, 3, 5;
- TSTR vs TRTR (balanced accuracy of a linear probe in the encoder's space) at matched training-set sizes;
- low data (`low_data`): a probe on k = 1, 5, 20 real tiles per class, with and without the adapted model's tiles,
  and the paired gain with its interval;
- adaptation length (`length`): adapter + LoRA trained for 1000 and 3000 updates, with FD, class fidelity,
  TSTR/TRTR and the low-data gains of each.

    python benchmarks/bench_adaptation.py --json outputs/bench-adaptation.json
    python benchmarks/bench_adaptation.py --sections core --steps 150    # the four adaptation variants only

The toy domains are synthetic; these numbers say that the method and the code learn, not how PixCell-256 behaves
on real tissue.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixcell_ext.evaluation.downstream import ProbeSettings, low_data_curve  # noqa: E402
from pixcell_ext.evaluation.probe import tstr_trtr  # noqa: E402
from pixcell_ext.model import networks  # noqa: E402
from pixcell_ext.stacks import mini  # noqa: E402
from pixcell_ext.stacks import mini_diagnosis as md  # noqa: E402
from pixcell_ext.stacks import mini_eval as me  # noqa: E402

SECTIONS = ("source", "core", "class", "tstr", "low_data", "guidance", "placement", "length")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="Write every number here.")
    parser.add_argument("--mini_dir", default=mini.MINI_DIR, help="Where the toy tiles are written (once).")
    parser.add_argument("--assets", default=str(mini.MINI_ASSETS), help="The mini models (default: committed).")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=int, default=300, help="Training updates of every variant (fixed budget).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--images_per_class", type=int, default=20)
    parser.add_argument(
        "--low_data_images_per_class", type=int, default=40, help="Synthetic tiles per class added in `low_data`."
    )
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="1: the lowest FD in the sweep.")
    parser.add_argument(
        "--length_steps", type=int, nargs="+", default=[1000, 3000], help="Adaptation lengths of `length`."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples_dir", default="outputs/bench-adaptation", help="Contact sheets of the samples.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stack = mini.write_mini_stack(args.mini_dir, Path(args.assets))
        self.scheduler_config = networks.load_scheduler_config(str(self.stack.pixcell))
        self.vae = networks.load_vae(str(self.stack.vae))
        self.uni = networks.load_uni(str(self.stack.uni))
        self.judge = me.load_mini_judge(self.stack.judge)
        resolution = mini.MINI_RESOLUTION
        self.train = me.encode_tiles(self.stack.target_train, self.vae, self.uni, resolution)
        self.heldout = me.encode_tiles(self.stack.target_heldout, self.vae, self.uni, resolution)
        self.test = me.encode_tiles(self.stack.target_test, self.vae, self.uni, resolution)
        self.real_judge = self.judge(self.heldout.pixels)[1]
        self.real_encoder = self.heldout.embedding.flatten(1)
        self.request = me.reference_request(self.train, args.images_per_class, args.seed)
        self.budget = me.Budget(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate)
        self.trained: dict[str, me.Adapted] = {}
        self.train_seconds: dict[str, float] = {}

    @functools.cached_property
    def references(self) -> dict[str, dict[str, float]]:
        """The rows every adaptation table starts with, at the same n and class mix as its generated sets:
        independent real TARGET tiles (the test set: a perfect generator's value at this n) and the same tiles
        through the VAE alone (the VAE floor: the part of a gap no adapter or LoRA can close)."""
        real = me.reference_request(self.test, self.args.images_per_class, self.args.seed)
        return {
            "real (independent)": self.scores("real", self.test.pixels[real.references], real.class_ids),
            "VAE floor": self.scores(
                "vae-floor", me.vae_round_trip(self.vae, self.test, real.references), real.class_ids
            ),
        }

    def model(self, variant: me.Variant, steps: int | None = None) -> me.Adapted:
        """The variant trained for the run's budget, or for `steps` updates. Models are cached by variant name, so a
        variant trained for another length needs a name of its own (as `length` gives it)."""
        budget = self.budget if steps is None else replace(self.budget, steps=steps)
        if variant.name not in self.trained:
            started = time.perf_counter()
            self.trained[variant.name] = me.adapt(
                self.stack.pixcell, self.scheduler_config, self.vae.config, self.train, variant, budget
            )
            self.train_seconds[variant.name] = time.perf_counter() - started
        return self.trained[variant.name]

    def sample(self, model, request: me.Request | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        return me.generate(
            model,
            self.scheduler_config,
            self.vae,
            request or self.request,
            self.train,
            guidance_scale=self.args.guidance_scale if guidance_scale is None else guidance_scale,
            num_inference_steps=self.args.num_inference_steps,
            seed=self.args.seed,
        )

    def scores(self, name: str, images: torch.Tensor, class_ids: torch.Tensor) -> dict[str, float]:
        """FD/KID/precision/recall in judge and encoder space, and class fidelity; saves a contact sheet."""
        me.save_grid(images, Path(self.args.samples_dir) / f"{name}.png", self.args.images_per_class)
        _, judge_features = self.judge(images)
        encoder_features = self.uni(images).flatten(1).float()
        labels = {"real_labels": self.heldout.labels, "fake_labels": class_ids}
        return {
            **me.distribution_scores(self.real_judge, judge_features, "judge", **labels),
            **me.distribution_scores(self.real_encoder, encoder_features, "encoder", **labels),
            "class_fidelity": me.class_fidelity(self.judge, images, class_ids, self.train.class_names),
        }


BOTH = me.Variant("adapter+LoRA")
ADAPTER = me.Variant("adapter only", lora=False)
LORA = me.Variant("LoRA only", adapter=False)


def core(study: Study, results: dict) -> None:
    """The base model and the three adapted variants, below the reference rows."""
    rows = {
        **study.references,
        "base": study.scores("base", study.sample(me.base_model(study.stack.pixcell)), study.request.class_ids),
    }
    for variant in (ADAPTER, LORA, BOTH):
        adapted = study.model(variant)
        rows[variant.name] = study.scores(variant.name, study.sample(adapted.model), study.request.class_ids)
        rows[variant.name]["trainable"] = adapted.trainable_adapter + adapted.trainable_lora
        rows[variant.name]["train_seconds"] = study.train_seconds[variant.name]
    results["variants"] = rows
    results["vae_floor_fd_judge"] = rows["VAE floor"]["fd_judge"]
    results["vae_floor_fd_encoder"] = rows["VAE floor"]["fd_encoder"]
    results["fd_judge_base"] = rows["base"]["fd_judge"]
    results["fd_judge_adapted"] = rows[BOTH.name]["fd_judge"]
    results["class_fidelity_reference"] = rows[BOTH.name]["class_fidelity"]


def class_aware(study: Study, results: dict) -> None:
    class_only = me.Request(study.request.class_ids, None)
    conditioned = study.model(me.Variant("class conditioning", class_conditioning=True))
    plain = study.model(BOTH)
    with_loss = study.model(me.Variant("class loss 0.1", class_loss_weight=0.1))
    rows = {
        **study.references,
        "class-only, --class_conditioning": study.scores("class-only", study.sample(conditioned.model, class_only),
                                                         class_only.class_ids),
        "class-only, without (unconditional)": study.scores("unconditional", study.sample(plain.model, class_only),
                                                            class_only.class_ids),
        "reference, --class_conditioning": study.scores("reference-class", study.sample(conditioned.model),
                                                        study.request.class_ids),
        "reference, --class_loss_weight 0.1": study.scores("class-loss", study.sample(with_loss.model),
                                                           study.request.class_ids),
    }  # fmt: skip
    results["class_aware"] = rows
    results["class_fidelity_class_only"] = rows["class-only, --class_conditioning"]["class_fidelity"]
    results["class_fidelity_class_only_without_class_conditioning"] = rows["class-only, without (unconditional)"][
        "class_fidelity"
    ]


def placement(study: Study, results: dict) -> None:
    """LoRA alone (adapter frozen at identity), so the placement is the only thing that differs."""
    layers = study.model(LORA).model.transformer.config.num_layers
    third = max(1, layers // 3)
    rank = 8
    variants = [
        replace(LORA, name="LoRA early blocks (self-attn)", lora_targets=me.SELF_ATTENTION,
                lora_blocks=tuple(range(third)), lora_rank=rank * 3),
        replace(LORA, name="LoRA middle blocks (self-attn)", lora_targets=me.SELF_ATTENTION,
                lora_blocks=tuple(range(third, 2 * third)), lora_rank=rank * 3),
        replace(LORA, name="LoRA late blocks (self-attn)", lora_targets=me.SELF_ATTENTION,
                lora_blocks=tuple(range(layers - third, layers)), lora_rank=rank * 3),
        replace(LORA, name="LoRA all blocks, self-attn", lora_targets=me.SELF_ATTENTION, lora_rank=rank),
        replace(LORA, name="LoRA all blocks, cross-attn", lora_targets=me.CROSS_ATTENTION, lora_rank=rank * 2),
    ]  # fmt: skip
    rows = dict(study.references)
    for variant in variants:
        adapted = study.model(variant)
        rows[variant.name] = study.scores(variant.name, study.sample(adapted.model), study.request.class_ids)
        rows[variant.name]["trainable"] = adapted.trainable_lora
        rows[variant.name]["final_loss"] = adapted.final_loss
    results["placement"] = rows


def guidance(study: Study, results: dict) -> None:
    adapted = study.model(BOTH)
    results["guidance"] = {
        **study.references,
        **{
            str(g): study.scores(
                f"guidance-{g}", study.sample(adapted.model, guidance_scale=g), study.request.class_ids
            )
            for g in (1.0, 1.5, 2.0, 3.0, 5.0)
        },
    }


def source(study: Study, results: dict) -> None:
    """The base model on its own SOURCE domain, and the VAE's ceiling on every class-fidelity number."""
    features = me.encode_tiles(study.stack.source_heldout, study.vae, study.uni, mini.MINI_RESOLUTION)
    probe = md.fit_encoder_probe(features, references_per_class=10, seed=study.args.seed)
    diagnosis = md.diagnose(
        me.base_model(study.stack.pixcell),
        study.scheduler_config,
        study.vae,
        study.uni,
        features,
        probe,
        runs=[("dpm", study.args.num_inference_steps, g) for g in (1.0, 1.5, 2.0, 3.0)]
        + [("ddpm", 100, g) for g in (1.0, 2.0)],
        seed=study.args.seed,
    )
    ceiling = md.vae_ceiling(study.vae, study.uni, features, probe)
    psnr = md.vae_psnr(study.vae, md.source_and_target_tiles(20, mini.MINI_RESOLUTION), features.class_names)
    results["source"] = {**diagnosis, "vae_ceiling": ceiling, "vae_psnr": psnr}
    by_guidance = {run["guidance"]: run["class_fidelity"] for run in diagnosis["runs"] if run["sampler"] == "dpm"}
    results["class_fidelity_base_source"] = diagnosis["best"]["class_fidelity"]
    results["class_fidelity_base_source_g1"] = by_guidance[1.0]
    results["class_fidelity_base_source_g2"] = by_guidance[2.0]
    results["vae_round_trip_probe_ratio"] = ceiling["round_trip_probe_ratio"]
    results["vae_psnr_db"] = psnr["psnr_pooled"]


def low_data(study: Study, results: dict) -> None:
    """A probe on k real TARGET tiles per class, with and without the adapted model's synthetic set, in the
    encoder's space; tested on the independent TARGET test set."""
    curve = low_data_curve_of(study, study.model(BOTH).model)
    results["low_data"] = curve
    for point in curve["points"]:
        results[f"low_data_gain_k{point['k']}"] = point["gain"]["value"]


def low_data_curve_of(study: Study, model) -> dict:
    request = me.reference_request(study.train, study.args.low_data_images_per_class, study.args.seed)
    images = study.sample(model, request)
    synthetic = study.uni(images).flatten(1).float().numpy()
    real = study.train.embedding.flatten(1).numpy()
    test = study.test.embedding.flatten(1).numpy()
    names = study.train.class_names
    features = np.concatenate([real, synthetic, test])
    labels = [
        names[i] for i in (*study.train.labels.tolist(), *request.class_ids.tolist(), *study.test.labels.tolist())
    ]
    offsets = np.cumsum([0, len(real), len(synthetic), len(test)])
    rows = {
        "real_train_full": range(offsets[0], offsets[1]),
        "synthetic_all": range(offsets[1], offsets[2]),
        "real_test": range(offsets[2], offsets[3]),
    }
    return low_data_curve(features, labels, rows, ProbeSettings(low_data_ks=(1, 5, 20), draws=10, seed=study.args.seed))


def tstr(study: Study, results: dict) -> None:
    """Probe on synthetic tiles vs on as many real TARGET tiles per class; both tested on an independent set."""
    results["tstr"] = tstr_of(study, study.model(BOTH).model)
    results["tstr_over_trtr"] = results["tstr"]["TSTR"] / results["tstr"]["TRTR"]


def tstr_of(study: Study, model) -> dict:
    images = study.sample(model)
    synthetic = (study.uni(images).flatten(1).float(), study.request.class_ids)
    real = (study.train.embedding[study.request.references].flatten(1), study.request.class_ids)
    test = (study.test.embedding.flatten(1), study.test.labels)
    probes = tstr_trtr(real, test, synthetic, seed=study.args.seed)
    tstr_value, trtr_value = probes["TSTR"]["balanced_accuracy"], probes["TRTR"]["balanced_accuracy"]
    return {"TSTR": tstr_value, "TRTR": trtr_value, "per_class_train": study.args.images_per_class}


def length(study: Study, results: dict) -> None:
    """Adapter + LoRA trained for each of `--length_steps` updates: does longer adaptation make more useful data?"""
    rows = dict(study.references)
    for steps in study.args.length_steps:
        name = f"adapter+LoRA, {steps} updates"
        adapted = study.model(replace(BOTH, name=name), steps=steps)
        row = study.scores(name, study.sample(adapted.model), study.request.class_ids)
        probes = tstr_of(study, adapted.model)
        curve = low_data_curve_of(study, adapted.model)
        row.update(
            train_seconds=study.train_seconds[name],
            tstr_over_trtr=probes["TSTR"] / probes["TRTR"],
            **{f"low_data_gain_k{p['k']}": p["gain"] for p in curve["points"]},
        )
        rows[name] = row
    results["length"] = rows


COLUMNS = {"fd_judge": "FD judge", "kid_judge_x1000": "KIDx1e3", "precision_judge": "precision",
           "recall_judge": "recall", "fd_encoder": "FD encoder", "kid_encoder_x1000": "KIDx1e3 enc",
           "class_fidelity": "fidelity"}  # fmt: skip


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'':38s}" + "".join(f"{title:>12s}" for title in COLUMNS.values()) + f"{'trainable':>11s}")
    for name, row in rows.items():
        cells = "".join(f"{row[c]:12.3f}" for c in COLUMNS)
        trainable = f"{row['trainable']:>11,d}" if "trainable" in row else ""
        print(f"{name:38s}{cells}{trainable}")


SECTION_FUNCTIONS = {"source": source, "core": core, "class": class_aware, "placement": placement,
                     "guidance": guidance, "tstr": tstr, "low_data": low_data, "length": length}  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    study = Study(args)
    results: dict = {}
    for section in SECTIONS:
        if section in args.sections:
            SECTION_FUNCTIONS[section](study, results)
            if args.json:  # after every section, so a long run keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    results["settings"] = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "machine": f"{platform.machine()} {platform.processor()}".strip() + f", {torch.get_num_threads()} threads",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "train_seconds": study.train_seconds,
        "total_seconds": time.perf_counter() - started,
        "chance": 1 / len(study.train.class_names),
    }
    print(f"\nmini stack, toy TARGET domain: {args.steps} updates of batch {args.batch_size} per variant, "
          f"{args.images_per_class} images per class, {args.num_inference_steps} DPM-Solver steps, "
          f"guidance {args.guidance_scale}; FD against {len(study.heldout.labels)} held-out TARGET tiles")  # fmt: skip
    for key, title in (("variants", "adaptation"), ("class_aware", "class-aware"), ("placement", "LoRA placement"),
                       ("guidance", "guidance scale (adapter+LoRA)"), ("length", "adaptation length")):  # fmt: skip
        if key in results:
            print_table(title, results[key])
    for name, row in results.get("length", {}).items():
        if "tstr_over_trtr" not in row:
            continue  # a reference row
        gains = [(key[len("low_data_gain_") :], row[key]) for key in row if key.startswith("low_data_gain_")]
        print(f"{name}: {row['train_seconds']:.0f} s of training, TSTR/TRTR {row['tstr_over_trtr']:.3f}, low-data gain "
              + ", ".join(f"{k} {g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" for k, g in gains))  # fmt: skip
    if "tstr" in results:
        t = results["tstr"]
        print(f"\nTSTR {t['TSTR']:.3f}  TRTR {t['TRTR']:.3f}  ratio {results['tstr_over_trtr']:.3f} "
              f"({t['per_class_train']} tiles per class each)")  # fmt: skip
    for key in ("vae_floor_fd_judge", "vae_floor_fd_encoder", "fd_judge_base", "fd_judge_adapted",
                "class_fidelity_reference", "class_fidelity_class_only",
                "class_fidelity_class_only_without_class_conditioning", "tstr_over_trtr"):  # fmt: skip
        if key in results:
            print(f"{key:55s} {results[key]:.4f}")
    print(f"total {results['settings']['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
