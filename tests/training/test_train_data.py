"""Training reads a class folder and the equivalent hub dataset alike: same tiles, same order, same weights."""

import os
import subprocess

import datasets
import pytest
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import REPO, launch_command
from pixcell_ext.data import scan_image_folder, tile_digests
from pixcell_ext.stacks.tiny import TINY_RESOLUTION
from pixcell_ext.training import feature_cache


def train(stack, output_dir, *extra: str, num_processes: int = 1) -> subprocess.CompletedProcess:
    args = [
        "--preset", "tiny", "--tiny_dir", str(stack.pixcell.parent), "--output_dir", str(output_dir),
        "--max_train_steps", "4", "--checkpointing_steps", "100", "--validation_steps", "100",
        "--report_to", "none", *extra,
    ]  # fmt: skip
    command = launch_command(num_processes, "train_adapter_lora.py", *args)
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def weights(directory):
    return {**load_file(directory / "adapter.safetensors"), **load_file(directory / "pytorch_lora_weights.safetensors")}


def largest_difference(a, b) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max(v.abs().max().item() for k, v in wa.items() if "lora_B" in k) > 0, "LoRA B never moved"
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def hub_dataset(folder, interleave: bool) -> datasets.Dataset:
    """`folder` as hub rows: encoded bytes and a ClassLabel; `interleave` mixes the classes row by row."""
    records = scan_image_folder(folder, verify=False).records
    order = list(range(len(records)))  # the folder's order: by class, then file name
    if interleave:
        rank = {i: sum(r.label == records[i].label for r in records[:i]) for i in order}
        order.sort(key=lambda i: (rank[i], records[i].label))
    names = scan_image_folder(folder, verify=False).class_names
    rows = {
        "image": [{"bytes": records[i].path.read_bytes(), "path": None} for i in order],
        "label": [records[i].label for i in order],
    }
    features_ = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    return datasets.Dataset.from_dict(rows, features=features_)


@pytest.fixture(scope="module")
def folder_run(tiny_stack, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("folder")
    train(tiny_stack, output_dir)
    return output_dir


def test_hub_repository_trains_the_same_weights_as_the_folder(tiny_stack, tmp_path, folder_run):
    repository = tmp_path / "repository"
    (repository / "data").mkdir(parents=True)
    hub_dataset(tiny_stack.data, interleave=False).to_parquet(repository / "data" / "train-00000-of-00001.parquet")
    # A loader worker reads the rows: the dataset travels to it pickled.
    result = train(tiny_stack, tmp_path / "hub", "--dataset_name", str(repository), "--dataloader_num_workers", "1")
    assert "Data: 36 tiles in 9 classes" in result.stderr
    assert largest_difference(tmp_path / "hub", folder_run) == 0.0
    assert not (tmp_path / "hub" / "hub_dataset").exists()  # nothing exported to folders


def test_saved_dataset_on_two_processes_with_a_cache_the_folder_reuses(tiny_stack, tmp_path, folder_run):
    hub_dataset(tiny_stack.data, interleave=True).save_to_disk(tmp_path / "saved")
    cache = tmp_path / "cache"
    train(
        tiny_stack, tmp_path / "hub", "--dataset_name", str(tmp_path / "saved"), "--feature_cache", str(cache),
        "--train_batch_size", "2", num_processes=2,
    )  # fmt: skip
    assert largest_difference(tmp_path / "hub", folder_run) <= 1e-4  # the cache's tolerance (test_train)

    def no_encoders():
        raise AssertionError("the folder's tiles should all be in the cache the dataset run built")

    index = scan_image_folder(tiny_stack.data)
    keys = feature_cache.build_feature_cache(
        Accelerator(cpu=True),
        index,
        tile_digests(index),
        feature_cache.FeatureCache(cache),
        vae_identity=feature_cache.model_identity(str(tiny_stack.vae)),
        uni_identity=feature_cache.model_identity(str(tiny_stack.uni)),
        resolution=TINY_RESOLUTION,
        load_encoders=no_encoders,
        batch_size=4,
    )
    assert len(set(keys)) == 36
