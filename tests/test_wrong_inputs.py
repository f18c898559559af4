"""Every wrong input stops the scripts in seconds with one sentence naming the flag (or file) and the fix, before any
model loads; under `accelerate launch --quiet` with no traceback. The model loaders are replaced by ones that fail
the test, so "before any model loads" is checked, not timed."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import REPO, launch_command
from pixcell_ext import data
from pixcell_ext.console import run_main
from pixcell_ext.model import networks
from pixcell_ext.model.lora_targets import BLOCK_LINEAR_LAYERS

sys.path.insert(0, str(REPO))
import evaluate_synthetic  # noqa: E402
import generate_synthetic  # noqa: E402
import train_adapter_lora  # noqa: E402


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for loader in ("load_pixcell_stack", "load_transformer", "load_vae", "load_uni"):
        monkeypatch.setattr(networks, loader, refuse)


def one_sentence(capsys, script, argv: list[str]) -> str:
    """The script's whole answer: status 2 and a single `error:` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: script.parse_args(argv), script.main)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tiny(stack, tmp_path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--tiny_dir", str(stack.pixcell.parent), "--output_dir", str(tmp_path / "out"), *extra]


TRAINING_CASES = {
    "negative steps": (["--max_train_steps", "-5"], "--max_train_steps -5 is not usable: give at least 1"),
    "zero steps": (["--max_train_steps", "0"], "--max_train_steps 0 is not usable: give at least 1"),
    "nan learning rate": (["--learning_rate", "nan"], "--learning_rate nan is not usable: give a finite number above"),
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate -1.0 is not usable"),
    "rank 0": (["--lora_rank", "0"], "--lora_rank 0 is not usable: give at least 1 (the default is 4)"),
    "block 99": (["--lora_blocks", "99"], "--lora_blocks 99: bad block spec part '99' in '99': out of range"),
    "unknown target": (["--lora_targets", "attn1.to_qq"], "--lora_targets attn1.to_qq: no such layer"),
    "checkpointing 0": (["--checkpointing_steps", "0"], "--checkpointing_steps 0 is not usable: give at least 1"),
    "batch 0": (["--train_batch_size", "0"], "--train_batch_size 0 is not usable: give at least 1"),
    "accumulation 0": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0 is not usable"),
    "dropout 2": (["--cond_dropout", "2"], "--cond_dropout 2.0 is not usable: give a probability, from 0 to 1"),
}


@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_training_values_are_refused_before_anything_loads(case, tiny_stack, tmp_path, capsys, no_model_loads):
    flags, expected = TRAINING_CASES[case]
    message = one_sentence(capsys, train_adapter_lora, tiny(tiny_stack, tmp_path, *flags))
    assert expected in message
    assert not (tmp_path / "out").exists()  # refused while parsing: not even the output folder was made


def test_a_missing_checkpoint_is_named_with_the_complete_ones(tiny_stack, tmp_path, capsys, no_model_loads):
    missing = tmp_path / "out" / "checkpoint-999"
    message = one_sentence(
        capsys, train_adapter_lora, tiny(tiny_stack, tmp_path, "--resume_from_checkpoint", str(missing))
    )
    assert f"--resume_from_checkpoint '{missing}' is not a complete checkpoint" in message
    assert "Complete ones in" in message and "none" in message


def test_lora_placement_is_read_from_the_models_config_json(tiny_stack):
    """The layer names the checks accept are those of a real PixCell block, and its block count is config.json's."""
    import torch

    transformer = networks.load_transformer(str(tiny_stack.pixcell))
    block = transformer.transformer_blocks[0]
    linears = sorted(name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear))
    assert linears == sorted(BLOCK_LINEAR_LAYERS)
    config = json.loads((tiny_stack.pixcell / "transformer" / "config.json").read_text())
    assert config["num_layers"] == len(transformer.transformer_blocks) == 4


GENERATION_CASES = {
    "no images": (["--num_images_per_class", "0"], "--num_images_per_class 0 is not usable: give at least 1"),
    "nan guidance": (["--guidance_scale", "nan"], "--guidance_scale nan is not usable: give a finite number, 0 or"),
}


@pytest.mark.parametrize("case", sorted(GENERATION_CASES))
def test_generation_values_are_refused_before_anything_loads(case, tiny_stack, tmp_path, capsys, no_model_loads):
    flags, expected = GENERATION_CASES[case]
    assert expected in one_sentence(capsys, generate_synthetic, tiny(tiny_stack, tmp_path, *flags))


@pytest.mark.parametrize("name", ["generate", "evaluate"])
def test_an_output_dir_that_is_a_file_is_refused(name, tiny_stack, tmp_path, capsys, no_model_loads):
    script = {"generate": generate_synthetic, "evaluate": evaluate_synthetic}[name]
    (tmp_path / "out").write_text("a file where the output folder should be")
    argv = tiny(tiny_stack, tmp_path)
    message = one_sentence(capsys, script, argv)
    assert f"--output_dir '{tmp_path / 'out'}' is a file, not a folder" in message


def test_evaluation_values_are_refused_before_anything_loads(tiny_stack, tmp_path, capsys, no_model_loads):
    message = one_sentence(capsys, evaluate_synthetic, tiny(tiny_stack, tmp_path, "--confidence", "1.5"))
    assert "--confidence 1.5 is not usable: give a number above 0 and below 1 (the default is 0.95)" in message
    message = one_sentence(capsys, evaluate_synthetic, tiny(tiny_stack, tmp_path, "--low_data_ks", "0", "10"))
    assert "--low_data_ks [0, 10] is not usable" in message


def test_the_launcher_passes_on_the_sentence_without_a_traceback(tiny_stack, tmp_path):
    """`accelerate launch --quiet` (the README's $LAUNCH): without --quiet the launcher adds its own traceback."""
    command = launch_command(1, "train_adapter_lora.py", *tiny(tiny_stack, tmp_path, "--max_train_steps", "-5"))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: --max_train_steps -5 is not usable: give at least 1" in result.stderr
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr


def test_duplicated_tiles_are_warned_about_by_name(tiny_stack, tmp_path, caplog):
    folder = tmp_path / "data"
    shutil.copytree(tiny_stack.data, folder)
    original = sorted((folder / "ADI").iterdir())[0]
    shutil.copy(original, folder / "TUM" / f"copy{original.suffix}")
    args = train_adapter_lora.parse_args(tiny(tiny_stack, tmp_path, "--train_data_dir", str(folder)))
    with caplog.at_level("WARNING"):
        index, digests = train_adapter_lora.load_index(args, None)
    assert len(digests) == len(index.records) == 37
    assert data.duplicate_tiles(index, digests) == [[original, folder / "TUM" / f"copy{original.suffix}"]]
    assert "1 tile(s) repeat the bytes of another" in caplog.text and str(original) in caplog.text


def test_help_imports_no_heavy_module():
    """`--help` answers at once (0.2 s measured, 9-25 s before) because torch and diffusers are imported only by the
    code that runs after parsing."""
    for script in ("train_adapter_lora.py", "generate_synthetic.py", "evaluate_synthetic.py"):
        probe = (
            "import runpy, sys\n"
            f"sys.argv = ['{script}', '--help']\n"
            "try:\n"
            f"    runpy.run_path('{REPO / script}', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted({'torch', 'diffusers', 'accelerate', 'timm'} & set(sys.modules)))\n"
        )
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert result.stdout.strip().endswith("[]"), (script, result.stdout[-300:], result.stderr[-2000:])


def test_weight_files_get_the_permissions_of_every_other_output(tmp_path):
    import torch

    from pixcell_ext.files import save_safetensors_atomically, write_json_atomically

    umask = os.umask(0o022)
    try:
        save_safetensors_atomically({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        write_json_atomically(tmp_path / "c.json", {})
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"w.safetensors": 0o644, "c.json": 0o644}


def launch(argv: list[str]) -> subprocess.CompletedProcess:
    command = launch_command(1, "train_adapter_lora.py", *argv)
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def test_resuming_on_other_data_is_refused_unless_allowed_and_then_both_are_recorded(tiny_stack, tmp_path):
    base = tiny(tiny_stack, tmp_path, "--dataloader_num_workers", "0", "--validation_steps", "100")
    first = launch([*base, "--max_train_steps", "2", "--checkpointing_steps", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    # A log file a person can read: no progress-bar redraws, no rank on a one-process run, the plan in words.
    assert "\r" not in first.stderr and "RANK" not in first.stderr and "[rank" not in first.stderr
    assert "2 updates in all, 9 updates per epoch, so 1 epoch" in first.stderr
    recorded = json.loads((tmp_path / "out" / "training_config.json").read_text())

    other = tmp_path / "other"
    shutil.copytree(tiny_stack.data, other)
    shutil.copy(sorted((other / "ADI").iterdir())[0], other / "TUM" / "TUM-extra.tif")
    resume = [*base, "--train_data_dir", str(other), "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    refused = launch(resume)
    assert refused.returncode != 0 and "Loaded PixCell" not in refused.stderr
    assert f"checkpoint-2 in '{tmp_path / 'out'}' was trained on other data ('{tiny_stack.data}'" in refused.stderr
    assert "pass --allow_other_data if continuing on new data is intended" in refused.stderr
    assert "Traceback" not in refused.stderr

    allowed = launch([*resume, "--allow_other_data"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert config["train_data_dir"] == str(other) and config["data_sha256"] != recorded["data_sha256"]
    assert config["earlier_data"] == [
        {"data": str(tiny_stack.data), "data_sha256": recorded["data_sha256"], "until_step": 2}
    ]


@pytest.mark.parametrize("manifest_kind", ["references edited away", "header only"])
def test_evaluation_says_when_the_reference_checks_could_not_run_and_names_missing_classes(
    manifest_kind, tiny_stack, tmp_path, monkeypatch, caplog
):
    from pixcell_ext.generation.manifest import read_manifest, write_manifest
    from pixcell_ext.stacks.testing_assets import write_standin_synthetic

    monkeypatch.chdir(tmp_path)
    synthetic = write_standin_synthetic(tiny_stack.data, tmp_path / "synthetic")
    shutil.rmtree(synthetic / "TUM")
    rows = [row for row in read_manifest(synthetic) if row["class"] != "TUM"]
    edited = [{**row, "reference": f"moved/{row['reference']}"} for row in rows]
    write_manifest(synthetic, edited if manifest_kind == "references edited away" else [])
    argv = ["--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--synthetic_dir", str(synthetic),
            "--output_dir", str(tmp_path / "out"), "--extractors", "timm", "--dataloader_num_workers", "0"]  # fmt: skip
    with caplog.at_level("WARNING"):
        evaluate_synthetic.main(evaluate_synthetic.parse_args(argv))
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = {
        "references edited away": f"32 references in manifest.csv were not found (e.g. 'moved/{rows[0]['reference']}')",
        "header only": "manifest.csv in the synthetic folder lists none of its 32 tiles",
    }[manifest_kind]
    unchecked = [w for w in report["warnings"] if w.startswith(expected)]
    assert len(unchecked) == 1 and "the reference-overlap checks" in unchecked[0] and "did not run" in unchecked[0]
    assert sum(unchecked[0] in record.getMessage() for record in caplog.records) == 1  # and once in the log
    missing = [w for w in report["warnings"] if w.startswith("Real classes ['TUM'] have no synthetic tiles")]
    assert len(missing) == 1 and "'overall' included" in missing[0]
    assert report["classes"] == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR"]
