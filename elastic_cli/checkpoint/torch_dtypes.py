"""The safetensors dtype table as torch dtypes, for the code that works with torch tensors."""

from __future__ import annotations

import torch

from elastic_cli.checkpoint.safetensors_io import DTYPE_TABLE

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attribute) for name, (attribute, _) in DTYPE_TABLE.items()}
TORCH_TO_DTYPE: dict[torch.dtype, str] = {torch_dtype: name for name, torch_dtype in TORCH_DTYPES.items()}
