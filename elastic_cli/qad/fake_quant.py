"""Fake quantization for quantization-aware distillation: export numerics forward, identity backward.

The forward pass of :func:`fake_quantize` is exactly what a quantized checkpoint stores, read
back: the weight is rounded to its stored dtype (BF16 for a NemotronH Linear), quantized with
``elastic_cli.formats`` (the functions ``elastic quantize`` exports with) and dequantized to the
weight's own dtype. So, for the same amax, ``fake_quantize(w)`` equals
``dequantize_module(quantize_module(w.to(stored dtype)))`` bit for bit.

The backward pass is the straight-through estimator: the incoming gradient passes to the weight
unchanged, also for elements that saturate at the top of the format.

Scales come from a fixed weight amax (the PTQ state's), not from the current weight. NVFP4's
global scale and FP8's per-tensor scale are then constant during training and identical for
every budget, and NVFP4 block scales depend only on the 16 elements of their block. A row slice,
or a column slice at a multiple of 16, of the fake-quantized parent therefore equals the fake
quantization of the sliced weight, which is the nesting property export relies on.

NOTE: tests cover the CPU path. On CUDA the same ``elastic_cli.formats`` operations run, which
have not been compared with a CPU result on a GPU.
"""

from __future__ import annotations

import torch

from elastic_cli.formats import fp8, nvfp4
from elastic_cli.quantize.export import ModuleScales


class _NVFP4FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, global_scale: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
        packed, block_scale = nvfp4.quantize(weight.to(stored_dtype), global_scale)
        return nvfp4.dequantize(packed, block_scale, global_scale, weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _FP8FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize(fp8.quantize(weight.to(stored_dtype), scale), scale, weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _RoundToStored(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
        return weight.to(stored_dtype).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def weight_scale(scales: ModuleScales, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return a module's fixed weight scale: NVFP4 global scale or FP8 per-tensor scale.

    Args:
        scales: The module's entry of the quantizer state; its ``weight_amax`` must be set.
        device: Where the 0-dimensional float32 result lives.

    Raises:
        ValueError: For an unknown format or a weight amax that is not positive.
        FormatError: For an amax the format cannot represent.
    """
    if scales.weight_amax <= 0:
        raise ValueError(f"weight amax {scales.weight_amax} is not positive; fill it from the weight first")
    if scales.format == "nvfp4":
        return nvfp4.global_scale(scales.weight_amax).to(device)
    if scales.format == "fp8":
        return fp8.per_tensor_scale(scales.weight_amax).to(device)
    raise ValueError(f"unknown quantization format {scales.format!r}; expected nvfp4 or fp8")


def fake_quantize(weight: torch.Tensor, fmt: str, scale: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
    """Quantize and dequantize a weight as export would, with a straight-through gradient.

    Args:
        weight: High-precision weight [out_features, in_features] (float32 master copy).
        fmt: ``nvfp4`` or ``fp8``.
        scale: The module's fixed scale from :func:`weight_scale` (0-dimensional float32).
        stored_dtype: The dtype the source checkpoint stores the weight in; the weight is
            rounded to it before quantizing, as export quantizes the stored weight.

    Returns:
        A tensor of ``weight``'s shape and dtype holding the dequantized values.

    Raises:
        ValueError: For an unknown format.
        FormatError: For NaN or Inf in the weight, or an input width NVFP4 cannot block.
    """
    if fmt == "nvfp4":
        return _NVFP4FakeQuant.apply(weight, scale, stored_dtype)
    if fmt == "fp8":
        return _FP8FakeQuant.apply(weight, scale, stored_dtype)
    raise ValueError(f"unknown quantization format {fmt!r}; expected nvfp4 or fp8")


def round_to_stored(weight: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
    """Round a weight to its stored dtype and back, with a straight-through gradient.

    The student keeps float32 master weights so that small updates accumulate, but its forward
    pass uses each weight as the exported checkpoint will store it.
    """
    if weight.dtype == stored_dtype:
        return weight
    return _RoundToStored.apply(weight, stored_dtype)
