"""A small, idempotent fix for library versions that PixCell's released code trips over.

The released PixCell remote code imports `transformers.modeling_layers.GradientCheckpointingLayer`, which older
transformers releases lack; notebooks patched that by hand. `networks.load_remote_pipeline` installs the stand-in
before it loads that code. Our own scripts never need it: they use the native class in `models`.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _GradientCheckpointingLayerShim(nn.Module):
    """Stand-in with the contract of transformers' class: checkpoint `__call__` while training when enabled."""

    gradient_checkpointing = False

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def ensure_gradient_checkpointing_layer() -> type:
    """Return `transformers.modeling_layers.GradientCheckpointingLayer`, installing a shim only if it is missing.

    The real class is never shadowed: when transformers provides it, this function changes nothing.
    """
    transformers = importlib.import_module("transformers")
    try:
        module = importlib.import_module("transformers.modeling_layers")
    except ImportError:
        module = types.ModuleType("transformers.modeling_layers")
        sys.modules["transformers.modeling_layers"] = module
        transformers.modeling_layers = module
    if not hasattr(module, "GradientCheckpointingLayer"):
        _GradientCheckpointingLayerShim.__name__ = "GradientCheckpointingLayer"
        module.GradientCheckpointingLayer = _GradientCheckpointingLayerShim
    return module.GradientCheckpointingLayer
