"""Training an adapter + LoRA: the training step and its data loader, checkpoints, validation panels, the feature
cache and the run directory. Above `model`; below `generation` and `evaluation`, which read what it writes."""
