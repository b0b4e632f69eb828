"""FP8 (E4M3) per-tensor weight quantization: float8_e4m3fn elements, one fp32 scale.

Numerics contract
-----------------
A stored element q (float8_e4m3fn) and the tensor's scale s (float32) represent q * s.

* Scale: s = float32(amax) / 448, so amax maps to 448, the largest finite E4M3 value.
  An amax of 0 (an all-zero tensor) gives s = 1.0, which stores zeros as zero bytes.
  An amax whose scale would be below the smallest normal float32 raises FormatError,
  as does a zero, negative, NaN or Inf scale passed to ``quantize``.
* Elements: q = float8_e4m3fn(clamp(float32(x) / s, -448, 448)). The quotient is one
  float32 division, so a bf16 or fp16 weight is rounded once, to E4M3. The clamp
  saturates quotients beyond +-448, which occur when s is smaller than amax / 448.
  PyTorch 2.13 on CPU also saturates in the cast itself. The clamp keeps the bytes
  independent of how a PyTorch version or device casts out-of-range values, and never
  lets a NaN byte through. ``quantize`` skips the clamp only when max |x| / s rounds to at
  most 448, so that no quotient is out of range. The cast rounds to nearest, ties to
  even. NaN or Inf in the weight raises FormatError.
* Dequantize: float32(q) * s in float32, then cast to the requested dtype.

For a float32 weight and the same scale this gives the same bytes as ModelOpt 0.47.0
``FP8QTensor.quantize``. For a bf16 or fp16 weight it gives the bytes ModelOpt produces
for that weight converted to float32.

NOTE: ModelOpt 0.47.0 divides a bf16 weight by the scale in bf16 (on CPU, a float32
division rounded to bf16), so it rounds twice. On a random 1024 x 1024 bf16 weight,
3.4% of its bytes were one E4M3 step away from this module's. ModelOpt's own default
scale for a bf16 weight is also bf16, not float32. This module keeps float32
throughout on every device.
"""

import torch

from elastic_cli.formats.constants import (
    E4M3_MAX,
    FP8_SCALE_DIVISOR,
    FP32_MIN_NORMAL,
    ZERO_AMAX_SCALE,
)
from elastic_cli.formats.errors import (
    FormatError,
    check_amax,
    check_finite,
    check_float_dtype,
    check_scale,
)

# Elements per CPU chunk: 2**22 elements are a 16 MiB float32 buffer, the extra memory quantize
# needs beyond its output. Each chunk is split across torch's intra-op threads. Few chunks mean
# few Python iterations and few thread synchronizations, which cost most on a loaded machine.
_CPU_CHUNK_ELEMENTS = 2**22


def amax(weight: torch.Tensor) -> torch.Tensor:
    """Return max |weight| as a 0-dimensional float32 tensor (0 for an empty tensor).

    One ``aminmax`` pass instead of ``abs().amax()``, which would first write a full copy. NaN
    propagates, so a weight with NaN gives a NaN amax that the scale functions reject.
    """
    if weight.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=weight.device)
    minimum, maximum = torch.aminmax(weight)
    return torch.maximum(-minimum.float(), maximum.float())


def per_tensor_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Compute the per-tensor scale amax / 448.

    Args:
        amax: max of |weight| over the whole tensor, a scalar tensor or float. It is
            converted to float32 before the division.

    Returns:
        0-dimensional float32 tensor on the device of ``amax``, or 1.0 when amax is 0.

    Raises:
        FormatError: if amax is negative, NaN or Inf, has more than one element, or is so
            small (below about 5.3e-36) that the scale would be subnormal.
    """
    amax = torch.as_tensor(amax).to(torch.float32).reshape(-1)
    check_amax(amax)
    amax = amax.reshape(())

    if float(amax) == 0.0:
        return torch.full((), ZERO_AMAX_SCALE, dtype=torch.float32, device=amax.device)

    scale = amax / FP8_SCALE_DIVISOR
    if float(scale) < FP32_MIN_NORMAL:
        raise FormatError(
            f"amax {float(amax):g} is too small for FP8: the scale amax / "
            f"{FP8_SCALE_DIVISOR:g} would be below the smallest normal float32 and lose "
            "precision. Keep this tensor in BF16"
        )
    return scale


def quantize(weight: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize a weight to float8_e4m3fn with one per-tensor scale.

    Args:
        weight: float32, bfloat16 or float16 tensor of any shape, normally
            [out_features, in_features].
        scale: the per-tensor scale, normally ``per_tensor_scale(amax)``. A nested
            submodel passes its parent's scale here.

    Returns:
        float8_e4m3fn tensor with the shape of ``weight``.

    Raises:
        FormatError: for an invalid dtype, NaN or Inf in ``weight``, or a scale that is
            not a finite float32 >= 2**-126.
    """
    check_float_dtype(weight, "FP8 weight")
    scale = _checked_scale(scale, weight.device)

    flat = weight.reshape(-1)
    numel = flat.numel()
    quantized = torch.empty(numel, dtype=torch.float8_e4m3fn, device=weight.device)

    # On CPU, chunks keep the float32 temporary small. Other devices take the whole tensor
    # as one chunk.
    # NOTE: tests cover the CPU path only. The CUDA path runs the same operations but has
    # not been compared with ModelOpt on a GPU.
    chunk_elements = _CPU_CHUNK_ELEMENTS if weight.device.type == "cpu" else max(numel, 1)
    buffer = torch.empty(min(chunk_elements, numel), dtype=torch.float32, device=weight.device)

    # One aminmax over the whole tensor: min and max propagate NaN and Inf, so it finds both.
    extrema = torch.stack(torch.aminmax(flat)).float() if numel else None
    if extrema is not None and not bool(torch.isfinite(extrema).all()):
        check_finite(weight, "FP8 weight")
    needs_clamp = extrema is not None and _quotients_may_exceed_e4m3_max(extrema, scale)

    for start in range(0, numel, chunk_elements):
        end = min(start + chunk_elements, numel)
        chunk = flat[start:end]

        # An exact float32 copy, then in-place float32 division, so the quotient is rounded
        # once. Dividing the bf16 chunk by the 0-dimensional scale would return a bf16 quotient.
        quotient = buffer[: end - start].copy_(chunk)
        quotient.div_(scale)
        if needs_clamp:
            quotient.clamp_(min=-E4M3_MAX, max=E4M3_MAX)
        quantized[start:end].copy_(quotient)  # the copy casts to float8_e4m3fn

    return quantized.reshape(weight.shape)


def dequantize(
    quantized: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Expand float8_e4m3fn elements back to values q * s.

    Args:
        quantized: float8_e4m3fn tensor, as ``quantize`` returns.
        scale: the per-tensor scale used to quantize.
        dtype: output dtype.

    Returns:
        Tensor of ``dtype`` with the shape of ``quantized``.

    Raises:
        FormatError: if ``quantized`` is not float8_e4m3fn or the scale is not a finite
            float32 >= 2**-126.
    """
    if quantized.dtype != torch.float8_e4m3fn:
        raise FormatError(f"FP8 data must be float8_e4m3fn, got {quantized.dtype}")
    scale = _checked_scale(scale, quantized.device)

    return (quantized.to(torch.float32) * scale).to(dtype)


def _quotients_may_exceed_e4m3_max(extrema: torch.Tensor, scale: torch.Tensor) -> bool:
    """Return whether any float32(x) / scale can lie outside [-448, 448].

    ``extrema`` is the finite float32 [min, max] of the weight. Float32 division rounds
    correctly and so is monotonic. When max |x| / scale rounds to at most 448, so does every
    other quotient, and the clamp would change no element. With the default scale
    amax / 448, amax / scale rounds to exactly 448 for about 91% of bf16 and fp16 amax values
    and to the next float32 above 448 for the rest.
    """
    return float(extrema.abs().max() / scale) > E4M3_MAX


def _checked_scale(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    scale = torch.as_tensor(scale).to(device=device, dtype=torch.float32)
    check_scale(scale, "FP8 scale")
    return scale.reshape(())
