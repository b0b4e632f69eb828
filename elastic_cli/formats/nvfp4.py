"""NVFP4 weight quantization: E2M1 elements, E4M3 block scales, one fp32 global scale.

Numerics contract
-----------------
A weight [out_features, in_features] is cut into blocks of 16 consecutive elements along
in_features. A stored element e (E2M1), its block's scale s (float8_e4m3fn) and the
tensor's global scale g (float32) represent the value e * s * g.

* Global scale: g = float32(amax) / 2688, where 2688 = 6 * 448 (E2M1 max times E4M3 max).
  An amax of 0 gives g = 1.0. An amax whose g would be below the smallest normal float32
  raises FormatError.
* Block scale: s = block_amax / (6 * g), with 6 * g rounded to float32 first. A result of
  exactly 0 (an all-zero block, or a ratio that underflows) is replaced by 1.0. Then s is
  clamped to [2**-9, 448] and cast to float8_e4m3fn (round to nearest even). Shape
  [out_features, in_features / 16].
* Elements: x / (float32(s) * g), the product rounded to float32 first, then the quotient
  is rounded to E2M1 as ``elastic_cli.formats.e2m1`` defines: nearest, ties to even,
  saturating at +-6. Codes are packed two per byte, element 2k in the low nibble of
  byte k, giving uint8 [out_features, in_features / 2].
* Dequantize: e * (float32(s) * g) in float32, then cast to the requested dtype.

All arithmetic is float32, whatever the input dtype (float32, bfloat16 or float16).
With the same global scale, these steps give the same bytes as ModelOpt 0.47.0
``NVFP4QTensor.quantize`` (block size 16), except for an all-zero tensor. There ModelOpt
divides 0 by a global scale of 0 and stores NaN block scales and code 7 (6.0), whereas
this module stores scale 1.0 and code 0.

A global scale smaller than amax / 2688 is allowed. Then block scales clamp at 448 and
elements saturate at +-6.
"""

import torch

from elastic_cli.formats import e2m1
from elastic_cli.formats.constants import (
    E2M1_MAX,
    FP32_MIN_NORMAL,
    NVFP4_BLOCK_SCALE_MAX,
    NVFP4_BLOCK_SCALE_MIN,
    NVFP4_BLOCK_SIZE,
    NVFP4_EMPTY_BLOCK_SCALE,
    NVFP4_GLOBAL_SCALE_DIVISOR,
    ZERO_AMAX_SCALE,
)
from elastic_cli.formats.errors import (
    FormatError,
    check_amax,
    check_finite,
    check_float_dtype,
    check_scale,
)

# Blocks per CPU chunk: 2**15 blocks are 2**19 elements, 2 MiB per float32 temporary.
_CPU_CHUNK_BLOCKS = 2**15


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Compute the per-tensor global scale amax / (6 * 448).

    Args:
        amax: max of |weight| over the whole tensor, a scalar tensor or float. It is
            converted to float32 before the division.

    Returns:
        0-dimensional float32 tensor on the device of ``amax``, or 1.0 when amax is 0.

    Raises:
        FormatError: if amax is negative, NaN or Inf, has more than one element, or is so
            small (below about 3.2e-35) that the scale would be subnormal.
    """
    amax = torch.as_tensor(amax).to(torch.float32).reshape(-1)
    check_amax(amax)
    amax = amax.reshape(())

    if float(amax) == 0.0:
        return torch.full((), ZERO_AMAX_SCALE, dtype=torch.float32, device=amax.device)

    scale = amax / NVFP4_GLOBAL_SCALE_DIVISOR
    if float(scale) < FP32_MIN_NORMAL:
        raise FormatError(
            f"amax {float(amax):g} is too small for NVFP4: the global scale amax / "
            f"{NVFP4_GLOBAL_SCALE_DIVISOR:g} would be below the smallest normal float32 "
            "and lose precision. Keep this tensor in BF16"
        )
    return scale


def block_scale(weight: torch.Tensor, global_scale: torch.Tensor | float) -> torch.Tensor:
    """Compute the float8_e4m3fn scale of every block of 16 input elements.

    Args:
        weight: float32, bfloat16 or float16 tensor [out_features, in_features], or any
            [..., in_features], with in_features a multiple of 16.
        global_scale: the tensor's global scale, see ``global_scale``.

    Returns:
        float8_e4m3fn tensor [out_features, in_features / 16].

    Raises:
        FormatError: for an invalid dtype or shape, NaN or Inf in ``weight``, or a
            global scale that is not a finite float32 >= 2**-126.
    """
    blocks = _as_blocks(weight)
    global_scale_fp32 = _checked_global_scale(global_scale, weight.device)
    return _block_scale_from_amax(_block_amax(blocks, weight), global_scale_fp32)


def quantize(
    weight: torch.Tensor, global_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight to packed E2M1 elements and E4M3 block scales.

    Args:
        weight: float32, bfloat16 or float16 tensor [out_features, in_features], or any
            [..., in_features], with in_features a multiple of 16.
        global_scale: the tensor's global scale, normally ``global_scale(amax)``. A
            nested submodel passes its parent's global scale here.

    Returns:
        ``(packed, block_scale)``: uint8 [out_features, in_features / 2] with element 2k
        in the low nibble of byte k, and float8_e4m3fn [out_features, in_features / 16].

    Raises:
        FormatError: for an invalid dtype or shape, NaN or Inf in ``weight``, or a
            global scale that is not a finite float32 >= 2**-126.
    """
    blocks = _as_blocks(weight).reshape(-1, NVFP4_BLOCK_SIZE)  # [num_blocks, 16]
    global_scale_fp32 = _checked_global_scale(global_scale, weight.device)

    num_blocks = blocks.shape[0]
    device = weight.device
    packed = torch.empty(num_blocks, NVFP4_BLOCK_SIZE // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(num_blocks, dtype=torch.float8_e4m3fn, device=device)

    # On CPU, chunks keep the float32 and int32 temporaries in cache. Other devices take
    # the whole tensor as one chunk.
    # NOTE: tests cover the CPU path only. The CUDA path runs the same operations but has
    # not been compared with ModelOpt on a GPU.
    chunk_blocks = _CPU_CHUNK_BLOCKS if device.type == "cpu" else num_blocks
    buffer = torch.empty(
        min(chunk_blocks, num_blocks), NVFP4_BLOCK_SIZE, dtype=torch.float32, device=device
    )
    chunk_amax_maxima = []
    for start in range(0, num_blocks, chunk_blocks):
        end = min(start + chunk_blocks, num_blocks)

        # An explicit float32 copy, then in-place division: the same float32(x) / (s * g)
        # as dividing bf16 by a float32 tensor, which took about 20x longer with PyTorch
        # 2.13 on a 2-core CPU.
        scaled = buffer[: end - start].copy_(blocks[start:end])  # [chunk, 16] float32

        block_amax = scaled.abs().amax(dim=-1)  # [chunk]
        chunk_amax_maxima.append(block_amax.amax())
        chunk_scales = _block_scale_from_amax(block_amax, global_scale_fp32)
        scales[start:end] = chunk_scales

        denominator = chunk_scales.to(torch.float32) * global_scale_fp32  # [chunk]
        scaled /= denominator.unsqueeze(-1)
        packed[start:end] = e2m1.pack_int(e2m1.encode_float32_(scaled))

    # amax propagates NaN and Inf, so one check after the loop covers every element.
    if not bool(torch.isfinite(torch.stack(chunk_amax_maxima)).all()):
        check_finite(weight, "NVFP4 weight")

    leading_shape = weight.shape[:-1]
    in_features = weight.shape[-1]
    return (
        packed.reshape(*leading_shape, in_features // 2),
        scales.reshape(*leading_shape, in_features // NVFP4_BLOCK_SIZE),
    )


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Expand packed E2M1 elements back to values e * s * g.

    Args:
        packed: uint8 [out_features, in_features / 2], as ``quantize`` returns.
        block_scale: float8_e4m3fn [out_features, in_features / 16].
        global_scale: the global scale used to quantize.
        dtype: output dtype.

    Returns:
        Tensor [out_features, in_features] of ``dtype``.

    Raises:
        FormatError: if dtypes or shapes of ``packed`` and ``block_scale`` disagree, or
            the global scale is not a finite float32 >= 2**-126.
    """
    _check_packed(packed, block_scale)
    global_scale_fp32 = _checked_global_scale(global_scale, packed.device)

    codes = e2m1.unpack(packed)  # [..., in]
    values = e2m1.signed_value_table(packed.device)[codes.to(torch.int32)]
    blocks = values.view(*block_scale.shape, NVFP4_BLOCK_SIZE)  # [..., in / 16, 16]

    per_block = block_scale.to(torch.float32) * global_scale_fp32  # [..., in / 16]
    blocks = blocks * per_block.unsqueeze(-1)
    return blocks.reshape(codes.shape).to(dtype)


def _as_blocks(weight: torch.Tensor) -> torch.Tensor:
    """Return ``weight`` viewed as [..., in / 16, 16] after checking dtype and shape."""
    check_float_dtype(weight, "NVFP4 weight")

    if weight.ndim == 0 or weight.numel() == 0:
        raise FormatError(
            f"cannot quantize a tensor of shape {list(weight.shape)} to NVFP4: it must have "
            "at least one dimension and one element"
        )

    in_features = weight.shape[-1]
    if in_features % NVFP4_BLOCK_SIZE != 0:
        raise FormatError(
            f"cannot quantize a tensor of shape {list(weight.shape)} to NVFP4: the last "
            f"(input) dimension {in_features} is not a multiple of the block size "
            f"{NVFP4_BLOCK_SIZE}. Keep this tensor in BF16, or cut its input dimension at "
            f"a multiple of {NVFP4_BLOCK_SIZE}"
        )

    return weight.reshape(*weight.shape[:-1], in_features // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)


def _block_amax(blocks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return the float32 max of |x| per block, raising FormatError on NaN or Inf."""
    block_amax = blocks.abs().amax(dim=-1).to(torch.float32)  # [..., in / 16]

    # amax propagates NaN and Inf, so one scalar check covers every element.
    if not bool(torch.isfinite(block_amax.amax())):
        check_finite(weight, "NVFP4 weight")
    return block_amax


def _block_scale_from_amax(
    block_amax: torch.Tensor, global_scale_fp32: torch.Tensor
) -> torch.Tensor:
    scales = block_amax / (E2M1_MAX * global_scale_fp32)
    scales.masked_fill_(scales == 0, NVFP4_EMPTY_BLOCK_SCALE)
    scales.clamp_(min=NVFP4_BLOCK_SCALE_MIN, max=NVFP4_BLOCK_SCALE_MAX)
    return scales.to(torch.float8_e4m3fn)


def _checked_global_scale(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    scale = torch.as_tensor(scale).to(device=device, dtype=torch.float32)
    check_scale(scale, "NVFP4 global scale")
    return scale.reshape(())


def _check_packed(packed: torch.Tensor, block_scale: torch.Tensor) -> None:
    if packed.dtype != torch.uint8:
        raise FormatError(f"packed NVFP4 data must be uint8, got {packed.dtype}")
    if block_scale.dtype != torch.float8_e4m3fn:
        raise FormatError(f"NVFP4 block scale must be float8_e4m3fn, got {block_scale.dtype}")

    bytes_per_block = NVFP4_BLOCK_SIZE // 2
    if packed.ndim == 0 or packed.shape[-1] % bytes_per_block != 0:
        raise FormatError(
            f"packed NVFP4 data of shape {list(packed.shape)} must have a last dimension "
            f"that is a multiple of {bytes_per_block} (16 elements, two per byte)"
        )

    expected_scale_shape = [*packed.shape[:-1], packed.shape[-1] // bytes_per_block]
    if list(block_scale.shape) != expected_scale_shape:
        raise FormatError(
            f"NVFP4 block scale has shape {list(block_scale.shape)} but packed data of shape "
            f"{list(packed.shape)} needs {expected_scale_shape}. Slice both along the same axes"
        )
