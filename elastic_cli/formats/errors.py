"""The error raised for invalid quantization input, and the checks that raise it.

Each check takes a ``label`` such as "NVFP4 weight" that starts its message.
"""

import torch

from elastic_cli.formats.constants import FP32_MIN_NORMAL

SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FormatError(ValueError):
    """Invalid input to a quantize, dequantize or scale function.

    The message names the problem and the fix but not the tensor, because these functions
    only see values. Callers that know the tensor name add it when they re-raise.
    """


def check_float_dtype(tensor: torch.Tensor, label: str) -> None:
    """Raise FormatError unless ``tensor`` is float32, bfloat16 or float16."""
    if tensor.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise FormatError(
            f"{label} has dtype {tensor.dtype}, expected float32, bfloat16 or float16. "
            "Convert it with .to(torch.bfloat16) or .float() first"
        )


def check_finite(tensor: torch.Tensor, label: str) -> None:
    """Raise FormatError if ``tensor`` contains NaN or Inf, with the count of each."""
    if bool(torch.isfinite(tensor).all()):
        return

    nan_count = int(torch.isnan(tensor).sum())
    inf_count = int(torch.isinf(tensor).sum())
    raise FormatError(
        f"{label} of shape {list(tensor.shape)} contains {nan_count} NaN and "
        f"{inf_count} Inf values, but quantization needs finite values. Fix or "
        "exclude this tensor"
    )


def check_amax(amax: torch.Tensor) -> None:
    """Raise FormatError unless ``amax`` is one finite, non-negative value."""
    if amax.numel() != 1:
        raise FormatError(
            f"amax has {amax.numel()} elements, expected one per-tensor value. "
            "Reduce it with .abs().amax() first"
        )

    value = float(amax)
    if not torch.isfinite(amax).all() or value < 0.0:
        raise FormatError(
            f"amax is {value}, expected a finite value >= 0. Recompute it from finite "
            "weights with .abs().amax()"
        )


def check_scale(scale: torch.Tensor, label: str) -> None:
    """Raise FormatError unless ``scale`` is one finite fp32 value >= the smallest normal."""
    if scale.numel() != 1:
        raise FormatError(
            f"{label} has {scale.numel()} elements, expected a single per-tensor value"
        )

    value = float(scale)
    if not value >= FP32_MIN_NORMAL or value == float("inf"):
        raise FormatError(
            f"{label} is {value}, expected a finite value >= {FP32_MIN_NORMAL:g} (the smallest "
            "normal float32). A zero, negative, NaN or subnormal scale cannot represent "
            "nonzero data, so recompute it from the tensor's amax"
        )
