"""Quantization of NemotronH checkpoints to FP8 or NVFP4, nested structure intact."""
