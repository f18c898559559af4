import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_generate import cli, generate
from test_train import logged_losses, run_training, trained_weights

from pixcell_ext import NCT_CLASSES
from pixcell_ext.generation import manifest
from pixcell_ext.model.adapter import ADAPTER_FILE, AdapterConfig, UNIAdapter, load_adapter
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import LoRAConfig, inject_lora, lora_layers
from pixcell_ext.model.lora_targets import block_rank_pattern
from pixcell_ext.model.networks import load_transformer
from pixcell_ext.training.loop import build_adapted_model
from pixcell_ext.training.run_directory import save_trained


@pytest.fixture
def transformer(tiny_stack):
    return load_transformer(str(tiny_stack.pixcell))


def class_adapter(**overrides) -> UNIAdapter:
    config = dict(embed_dim=32, hidden_dim=16, class_names=NCT_CLASSES, class_conditioning=True, class_head=True)
    return UNIAdapter(AdapterConfig(**{**config, **overrides}))


def test_class_embedding_starts_at_zero_and_receives_gradients(transformer):
    torch.manual_seed(0)
    plain = AdaptedPixCell(transformer, UNIAdapter(AdapterConfig(embed_dim=32, hidden_dim=16)))
    torch.manual_seed(0)
    classed = AdaptedPixCell(transformer, class_adapter())
    uni, labels = torch.randn(4, 1, 32), torch.tensor([0, 3, 5, 8])
    assert torch.equal(classed.context(uni, labels=labels), plain.context(uni))  # step 0 is exactly PixCell
    noisy, t = torch.randn(4, 16, 8, 8), torch.tensor([10, 200, 500, 900])
    prediction, logits = classed(noisy, t, uni, labels=labels)
    assert torch.equal(prediction, plain(noisy, t, uni)[0])
    assert logits.shape == (4, 9)
    (prediction.square().mean() + torch.nn.functional.cross_entropy(logits, labels)).backward()
    grad = classed.adapter.class_embedding.weight.grad
    assert grad[labels].abs().sum(dim=1).min() > 0  # every used class gets a gradient
    assert grad[[1, 2, 4, 6, 7]].abs().sum() == 0  # unused classes do not
    assert classed.adapter.class_head.weight.grad.abs().sum() > 0


def test_class_only_context_differs_per_class_once_trained(transformer):
    model = AdaptedPixCell(transformer, class_adapter())
    torch.nn.init.normal_(model.adapter.class_embedding.weight)
    contexts = model.class_only_context(torch.arange(9))
    null = model.unconditional_context(9)
    assert not torch.allclose(contexts, null)
    assert torch.allclose(contexts - null, model.adapter.class_embedding.weight.unsqueeze(1))


def test_uni_drop_keeps_the_class_but_drops_the_reference(transformer):
    model = AdaptedPixCell(transformer, class_adapter())
    torch.nn.init.normal_(model.adapter.class_embedding.weight)
    uni, labels = torch.randn(2, 1, 32), torch.tensor([2, 7])
    dropped = model.context(uni, labels=labels, uni_drop=torch.tensor([True, False]))
    assert torch.allclose(dropped[0], model.class_only_context(labels[:1])[0])
    assert torch.allclose(dropped[1], model.context(uni[1:], labels=labels[1:])[0])


def test_adapters_saved_before_class_parts_still_load(tmp_path):
    old = UNIAdapter(AdapterConfig(embed_dim=32, hidden_dim=16))
    metadata = {"format": "pt", "adapter_config": json.dumps({"embed_dim": 32, "num_tokens": 1, "hidden_dim": 16})}
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, tmp_path / ADAPTER_FILE, metadata=metadata)
    loaded = load_adapter(tmp_path / ADAPTER_FILE)
    assert loaded.class_embedding is None and loaded.class_head is None
    with pytest.raises(ValueError, match="without --class_conditioning"):
        loaded(torch.randn(1, 1, 32), class_ids=torch.tensor([0]))


def test_class_parts_refuse_classes_they_were_not_trained_for():
    adapter = class_adapter(class_names=("ADI", "TUM"))
    assert adapter.class_ids(["TUM", "ADI"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="no class \\['STR'\\]"):
        adapter.class_ids(["ADI", "STR"])


def test_lora_lands_exactly_on_the_requested_blocks_with_their_ranks(transformer):
    config = LoRAConfig(rank=8, blocks=(0, 2), rank_pattern=block_rank_pattern("2=2", 4))
    names = inject_lora(transformer, config)
    expected = {f"transformer_blocks.{b}.{t}" for b in (0, 2) for t in config.target_modules}
    assert set(names) == expected == set(lora_layers(transformer))
    ranks = {name: layer.rank for name, layer in lora_layers(transformer).items()}
    assert {r for n, r in ranks.items() if n.startswith("transformer_blocks.0.")} == {8}
    assert {r for n, r in ranks.items() if n.startswith("transformer_blocks.2.")} == {2}
    with pytest.raises(ValueError, match="0-3"):
        block_rank_pattern("2-9=4", 4)


def test_lambda_zero_without_class_conditioning_is_the_plain_path(tiny_stack, tmp_path):
    plain, explicit = tmp_path / "plain", tmp_path / "explicit"
    common = ("--max_train_steps", "3", "--checkpointing_steps", "100")
    run_training(tiny_stack, plain, *common)
    run_training(tiny_stack, explicit, *common, "--class_loss_weight", "0", "--reference_dropout", "0.5")
    a, b = trained_weights(plain), trained_weights(explicit)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(plain) == logged_losses(explicit)


def test_class_head_loss_falls_on_the_toy_set(tiny_stack, tmp_path):
    output_dir = tmp_path / "head"
    run_training(
        tiny_stack, output_dir, "--max_train_steps", "40", "--checkpointing_steps", "100", "--class_loss_weight", "1",
        "--class_conditioning", "--learning_rate", "3e-3",
    )  # fmt: skip
    class_losses = logged_losses(output_dir, "class_loss")
    assert len(class_losses) == 40
    assert np.mean(class_losses[-8:]) < 0.7 * np.mean(class_losses[:8])
    assert np.mean(logged_losses(output_dir, "class_accuracy")[-8:]) > 0.5


@pytest.fixture
def class_run_dir(tiny_stack, tmp_path):
    """A class-conditioned run whose class embeddings differ, as after training."""
    lora_config = LoRAConfig(rank=4)
    adapter_config = class_adapter(class_head=False).config
    model = build_adapted_model(load_transformer(str(tiny_stack.pixcell)), lora_config, adapter_config)
    with torch.no_grad():
        model.adapter.class_embedding.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    save_trained(tmp_path / "run", model, lora_config)
    return tmp_path / "run"


def test_class_only_generation_for_a_class_without_references(tiny_stack, class_run_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_stack.data, data)
    shutil.rmtree(data / "MUC")
    output_dir = tmp_path / "out"
    generate(*cli(tiny_stack, class_run_dir, output_dir, "--reference_data_dir", str(data), "--classes", "ADI", "MUC",
                  "--num_images_per_class", "2"))  # fmt: skip
    rows = {r["file"]: r for r in manifest.read_manifest(output_dir)}
    assert {f: (r["conditioning"], r["reference"]) for f, r in rows.items() if r["class"] == "MUC"} == {
        f"MUC/gen_{i:04d}.png": ("class-only", "none") for i in range(2)
    }
    assert {r["conditioning"] for r in rows.values() if r["class"] == "ADI"} == {"reference+class"}
    assert (output_dir / "MUC" / "gen_0001.png").is_file()


def test_class_conditioned_run_refuses_classes_it_was_not_trained_on(tiny_stack, class_run_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_stack.data / "ADI", data / "ADI")
    shutil.copytree(tiny_stack.data / "TUM", data / "GLAND")
    with pytest.raises(ValueError, match="cannot generate \\['GLAND'\\]"):
        generate(*cli(tiny_stack, class_run_dir, tmp_path / "out", "--reference_data_dir", str(data)))
