"""The single-token cross-attention processor: same outputs and gradients as diffusers' processor, chosen per call."""

import subprocess
import sys

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import REPO, adapted_model
from pixcell_ext.model import networks
from pixcell_ext.model.attention import SingleTokenCrossAttnProcessor, check_lora_targets, install_standard_attention
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import lora_parameters
from pixcell_ext.model.lora_targets import DEFAULT_TARGET_MODULES
from pixcell_ext.model.sampling import sample_latents_cfg
from pixcell_ext.stacks.tiny import TINY_UNI_WIDTH

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def pixcell_1024_style(seed: int = 0) -> networks.PixCellTransformer2DModel:
    """Tiny widths, 16 UNI tokens with their positions, as PixCell-1024 is built."""
    torch.manual_seed(seed)
    return networks.PixCellTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, num_layers=3, cross_attention_dim=32, sample_size=8,
        caption_channels=TINY_UNI_WIDTH, interpolation_scale=0.5, caption_num_tokens=16,
    )  # fmt: skip


def step_inputs(transformer, batch: int = 3) -> dict:
    generator = torch.Generator().manual_seed(2)
    config = transformer.config
    shape = (batch, config.in_channels, config.sample_size, config.sample_size)
    return {
        "noisy_latents": torch.randn(shape, generator=generator),
        "timesteps": torch.tensor([10, 500, 999][:batch]),
        "uni_embedding": torch.randn((batch, 1, config.caption_channels), generator=generator),
    }


def forward_backward(model: AdaptedPixCell, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    prediction, _ = model(**inputs)
    # A loss that weights every output element differently, so no gradient cancels by symmetry.
    weights = torch.linspace(-1, 1, prediction.numel()).view_as(prediction)
    (prediction * weights).sum().backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return prediction.detach(), {name: p.grad.clone() for name, p in trainable.items() if p.grad is not None}


def count_query_calls(transformer) -> list[int]:
    """Calls of the cross-attention query projections: the single-token path never computes queries."""
    calls = [0]
    for name, module in transformer.named_modules():
        if name.endswith("attn2.to_q"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("tokens", [1, 16])
def test_same_outputs_and_gradients_as_the_standard_processor(tiny_stack, tokens):
    if tokens == 1:
        transformer = networks.load_transformer(str(tiny_stack.pixcell))
        targets = DEFAULT_TARGET_MODULES
    else:  # several tokens: LoRA on the cross-attention queries and keys learns, and is allowed
        transformer = pixcell_1024_style()
        targets = (*DEFAULT_TARGET_MODULES, "attn2.to_q", "attn2.to_k")
    model = adapted_model(transformer, tokens, targets)
    processors = {type(p) for name, p in transformer.attn_processors.items() if ".attn2." in name}
    assert processors == {SingleTokenCrossAttnProcessor}
    inputs = step_inputs(transformer)
    query_calls = count_query_calls(transformer)

    fast_output, fast_grads = forward_backward(model, inputs)
    fast_queries = query_calls[0]
    install_standard_attention(transformer)
    query_calls[0] = 0
    standard_output, standard_grads = forward_backward(model, inputs)

    num_blocks = transformer.config.num_layers
    assert query_calls[0] == num_blocks
    assert fast_queries == (0 if tokens == 1 else num_blocks)  # 16 tokens: the standard path, through the fallback
    torch.testing.assert_close(fast_output, standard_output, **TOLERANCE)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(fast_grads) == set(standard_grads) == expected
    lora = {id(p) for p in lora_parameters(transformer)}
    assert sum(id(p) in lora for p in model.parameters() if p.requires_grad) == len(lora) > 0
    for name in expected:
        assert standard_grads[name].abs().max() > 0, name
        torch.testing.assert_close(fast_grads[name], standard_grads[name], **TOLERANCE, msg=name)


def test_guided_sampling_gives_the_same_latents(tiny_stack):
    transformer = networks.load_transformer(str(tiny_stack.pixcell))
    model = adapted_model(transformer, 1).eval()
    inputs = step_inputs(transformer, batch=2)
    with torch.no_grad():
        context, null = model.context(inputs["uni_embedding"]), model.unconditional_context(2)

    def sample() -> torch.Tensor:
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return sample_latents_cfg(transformer, {"num_train_timesteps": 1000}, context, null, generators,
                                  guidance_scale=2.0, num_inference_steps=4)  # fmt: skip

    fast = sample()
    install_standard_attention(transformer)
    torch.testing.assert_close(fast, sample(), **TOLERANCE)


@pytest.mark.parametrize("target", ["attn2.to_q", "attn2.to_k"])
def test_lora_on_cross_attention_queries_or_keys_is_refused_with_one_token(tiny_stack, target):
    transformer = networks.load_transformer(str(tiny_stack.pixcell))
    with pytest.raises(ValueError, match=rf"cannot learn with a single condition token.*{target}"):
        adapted_model(transformer, 1, (*DEFAULT_TARGET_MODULES, target))
    with pytest.raises(ValueError, match=rf"--lora_targets.*Found: {target}"):
        check_lora_targets([*DEFAULT_TARGET_MODULES, target], context_tokens=1)
    check_lora_targets([*DEFAULT_TARGET_MODULES, target], context_tokens=16)
    check_lora_targets(DEFAULT_TARGET_MODULES, context_tokens=1)


def test_falls_back_to_the_standard_processor_with_a_mask():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, bias=True)
    hidden, context = torch.randn(2, 5, 16), torch.randn(2, 1, 8)
    mask = torch.tensor([[0.0], [-torch.inf]])  # the second image's only key is masked out
    standard = AttnProcessor2_0()(attn, hidden, context, attention_mask=mask)
    processor = SingleTokenCrossAttnProcessor()
    assert not processor.applies(attn, hidden, context, mask)
    torch.testing.assert_close(processor(attn, hidden, context, attention_mask=mask), standard, equal_nan=True)
    value = attn.to_out[0](attn.to_v(context))
    assert not torch.allclose(standard[1], value[1].expand(5, -1))  # the masked image is not its value row
    assert processor.applies(attn, hidden, context, None)
    torch.testing.assert_close(processor(attn, hidden, context), AttnProcessor2_0()(attn, hidden, context), **TOLERANCE)


def test_training_refuses_query_lora_before_loading_models(tmp_path):
    """The flags are checked in parse_args: the run stops in seconds, with nothing loaded and nothing written."""
    command = [
        sys.executable, str(REPO / "train_adapter_lora.py"), "--train_data_dir", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "run"), "--lora_targets", "attn1.to_q", "attn2.to_k",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "cannot learn with a single condition token" in result.stderr and "Found: attn2.to_k" in result.stderr
    assert not (tmp_path / "run").exists()
