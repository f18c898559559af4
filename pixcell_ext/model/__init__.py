"""The model: the PixCell transformer and its loaders, the UNI2-h adapter, LoRA layers and files, conditioning,
the diffusion objective and the sampler. It imports only the shared leaves, never another sub-package."""
