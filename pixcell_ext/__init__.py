"""Adapting PixCell-256 to a target histology dataset: adapter + LoRA, generation and evaluation."""

NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
