import os
import socket
import sys
from pathlib import Path

# No test may reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from pixcell_ext.stacks.tiny import write_tiny_stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot to them. Byte
    comparisons between runs also need equal thread counts: oneDNN convolutions round differently with more threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory):
    return write_tiny_stack(tmp_path_factory.mktemp("tiny"))


def adapted_model(transformer, tokens: int = 1, targets: tuple[str, ...] | None = None):
    """Adapter + rank-4 LoRA (`targets` None: the default ones) with non-zero weights everywhere, so every trainable
    parameter gets a real gradient. Its imports are local so that tests which never build a model skip diffusers."""
    import torch

    from pixcell_ext.model.adapter import AdapterConfig, UNIAdapter
    from pixcell_ext.model.conditioning import AdaptedPixCell
    from pixcell_ext.model.lora import LoRAConfig, inject_lora

    inject_lora(transformer, LoRAConfig(rank=4) if targets is None else LoRAConfig(rank=4, target_modules=targets))
    adapter = UNIAdapter(AdapterConfig(embed_dim=transformer.config.caption_channels, num_tokens=tokens, hidden_dim=32))
    model = AdaptedPixCell(transformer, adapter)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "adapter.fc2" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.train()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, script: str, *args: str) -> list[str]:
    """`python -m accelerate.commands.launch --quiet` (the README's $LAUNCH): the console script imports timm, this
    does not; `--quiet` keeps the launcher from adding a traceback to the scripts' one-sentence errors."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        command += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + [str(REPO / script), *args]
