"""Small, idempotent fixes for library versions that PixCell's released code trips over.

The released PixCell remote code imports `transformers.modeling_layers.GradientCheckpointingLayer`, which older
transformers releases lack; notebooks patched that by hand. Diffusers also routes LoRA handling through peft when
peft is installed; this project brings its own LoRA layers and can switch that routing off so that no LoRA state is
ever loaded twice or by the wrong code path.
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


def disable_diffusers_peft_backend() -> int:
    """Set diffusers' `USE_PEFT_BACKEND` to False in every loaded diffusers module; returns how many were changed.

    Diffusers copies the flag into each module at import time, so every copy has to be switched. Modules imported
    later read the constant from `diffusers.utils.constants`, which is switched too.
    """
    importlib.import_module("diffusers.utils.constants")
    changed = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(module, "USE_PEFT_BACKEND", None) is True:
            module.USE_PEFT_BACKEND = False
            changed += 1
    return changed
