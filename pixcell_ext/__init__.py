"""Adapting PixCell-256 to a target histology dataset: adapter + LoRA, generation and evaluation.

Names the command lines show as defaults live here, free of torch, so that `--help` answers at once.
"""

NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
PIXCELL_256_ID = "StonyBrook-CVLab/PixCell-256"
SD35_VAE_ID = "stabilityai/stable-diffusion-3.5-large"
UNI2H_ID = "hf-hub:MahmoodLab/UNI2-h"
SAMPLER_NAMES = ("dpm", "euler", "ddpm")
