"""`--compile`: the block-compiled transformer gives the eager results, in training and in guided sampling."""

import os
import time

import pytest
import torch

from conftest import adapted_model
from pixcell_ext.model import networks
from pixcell_ext.model.compilation import compile_transformer
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import merge_lora
from pixcell_ext.model.sampling import sample_latents_cfg

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Inductor compiles C++ kernels for the CPU: about a minute of CPU time, far more on a busy machine.
    pytest.mark.skipif(
        os.environ.get("PIXCELL_TEST_COMPILE") != "1", reason="opt-in (slow): set PIXCELL_TEST_COMPILE=1"
    ),
]

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def adapted(tiny_stack) -> AdaptedPixCell:
    transformer = networks.load_transformer(str(tiny_stack.pixcell))
    torch.manual_seed(0)  # the same LoRA A and adapter weights in every call
    return adapted_model(transformer)


def training_step(model: AdaptedPixCell, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn((2, config.in_channels, config.sample_size, config.sample_size), generator=generator)
    uni = torch.randn((2, 1, config.caption_channels), generator=generator)
    model.zero_grad(set_to_none=True)
    prediction, _ = model(latents, torch.tensor([10, 900]), uni, drop=torch.tensor([False, True]))
    (prediction * torch.linspace(-1, 1, prediction.numel()).view_as(prediction)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return prediction.detach(), grads


def test_compiled_training_step_and_sampling_match_eager(tiny_stack):
    eager, compiled = adapted(tiny_stack), adapted(tiny_stack)
    config = eager.transformer.config
    compile_transformer(compiled.transformer)
    state = compiled.state_dict()
    assert state.keys() == eager.state_dict().keys()  # module tree unchanged: LoRA/adapter files and DDP unaffected

    start = time.perf_counter()
    output, grads = training_step(compiled, config)
    first_call = time.perf_counter() - start
    expected_output, expected_grads = training_step(eager, config)
    torch.testing.assert_close(output, expected_output, **TOLERANCE)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=name)
    start = time.perf_counter()
    training_step(compiled, config)
    assert time.perf_counter() - start < first_call  # the second call reuses the compiled graph

    latents = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.eval()
        merge_lora(model.transformer)
        with torch.no_grad():
            uni = torch.randn((2, 1, config.caption_channels), generator=torch.Generator().manual_seed(3))
            context = model.context(uni)
            null = model.unconditional_context(2)
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        latents[name] = sample_latents_cfg(
            model.transformer, {"num_train_timesteps": 1000}, context, null, generators, num_inference_steps=3
        )
    torch.testing.assert_close(latents["compiled"], latents["eager"], **TOLERANCE)
