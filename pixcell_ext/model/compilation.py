"""`torch.compile` for the PixCell transformer, one block at a time (`--compile` in training and generation).

The blocks are compiled in place (`nn.Module.compile`) rather than the whole model wrapped: the 28 blocks run the
same code at the same shapes, so torch compiles one graph and reuses it for every block (parameters are graph
inputs), which keeps compile time at about one block's; and the module tree is unchanged, so state-dict keys, LoRA
save/load/merge, `accelerate`'s DDP wrapping and `unwrap_model` work exactly as without compilation. The patch
embedding, timestep embedding and final layer stay eager: they are a small share of the work.

Compilation changes float rounding (fused kernels), not the computation: outputs agree with eager to ~1e-6 relative
in fp32 (tests/model/test_compilation.py). Switching the LoRA merge state or the attention processor after the first
call recompiles once, since both are Python-level decisions guarded by torch.
"""

from __future__ import annotations

from pixcell_ext.model.networks import PixCellTransformer2DModel


def compile_transformer(transformer: PixCellTransformer2DModel, mode: str | None = None) -> None:
    """Compile every transformer block in place with `torch.compile(mode=mode)`; the first call pays the compile."""
    for block in transformer.transformer_blocks:
        block.compile(mode=mode)
