"""E2M1 (FP4) rounding, 4-bit codes and two-codes-per-byte packing.

Numerics contract
-----------------
Code: 4 bits, bit 3 is the sign and bits 0-2 index the magnitude table::

    index       0    1    2    3    4    5    6    7
    magnitude   0   0.5   1   1.5   2    3    4    6

Rounding: to the nearest magnitude. A value exactly halfway between two magnitudes goes
to the one with the even index (ties to even)::

    0.25 -> 0    0.75 -> 1    1.25 -> 1    1.75 -> 2    2.5 -> 2    3.5 -> 4    5 -> 4

The same holds for negative values. Computation is in float32 whatever the input dtype.

Saturation: a magnitude above 6, including Inf, encodes as 6 with its sign. NaN has no
code, so ``encode`` and ``round_to_e2m1`` raise FormatError on it.

Sign: bit 3 is set for every value < 0, also when the magnitude rounds to zero
(-0.1 -> 0b1000). The value -0.0 encodes as 0b0000. ``decode`` returns -0.0 for 0b1000.

Packing: two codes per byte, element 2k in the low nibble of byte k, so a code tensor
of shape [..., n] packs to uint8 [..., n / 2]::

    codes     c0    c1    c2    c3   ...
               \\    /      \\    /
    byte       byte 0      byte 1    ...
    bits     7..4 = c1   3..0 = c0

This is the layout of ModelOpt 0.47.0 ``NVFP4QTensor`` and of NVFP4 checkpoints that
vLLM, TensorRT-LLM and SGLang load.
"""

import torch

from elastic_cli.formats.constants import (
    E2M1_CODE_MASK,
    E2M1_MAGNITUDES,
    E2M1_MAX,
    E2M1_SIGN_BIT,
)
from elastic_cli.formats.errors import FormatError, check_float_dtype

# Rounding to E2M1 uses the float32 bit pattern and takes two paths:
#
# * Magnitudes below 1 lie on the uniform grid 0, 0.5, 1 (the subnormals and 1.0).
#   Adding 2**22, whose float32 spacing is 0.5, rounds the sum to that grid with float32's
#   own round-to-nearest-even. The low bits of the sum are then round(2 * magnitude),
#   which is the index 0, 1 or 2.
# * Magnitudes in [1, 6] are normal E2M1 numbers with 1 mantissa bit. Rounding the
#   23-bit float32 mantissa to its top bit, to nearest with ties to even, is an integer
#   add of 0x1FFFFF plus the kept bit (bit 22), then a shift right by 22. A mantissa carry
#   moves into the exponent, which is the correct next binade. Shifted, the float32
#   exponent field e and the kept bit m give (e << 1) | m, and E2M1's index of 2**(e-127)
#   * 1.m is that minus 252 ((127 - 1) << 1), because E2M1's exponent bias is 1.
#
# The normal path is never above the subnormal path for a magnitude below 1, and the
# subnormal path capped at 2 is never above the normal path for a magnitude of 1 or more.
# So the index is max(min(subnormal, 2), normal), with no branch.
_SUBNORMAL_ROUNDER = 2.0**22
_SUBNORMAL_ROUNDER_BITS = 0x4A800000
_NORMAL_ROUNDING_BIAS = 0x1FFFFF
_MANTISSA_DROP_BITS = 22
_EXPONENT_TO_INDEX_OFFSET = (127 - 1) << 1
_E2M1_MAX_BITS = 0x40C00000  # float32 bit pattern of 6.0
_FLOAT32_ABS_MASK = 0x7FFFFFFF


def encode(values: torch.Tensor) -> torch.Tensor:
    """Round values to E2M1 and return their 4-bit codes.

    Args:
        values: float32, bfloat16 or float16 tensor of any shape.

    Returns:
        uint8 tensor of the same shape, each element a code in 0..15.

    Raises:
        FormatError: if ``values`` has another dtype or contains NaN.
    """
    _check_no_nan(values)
    return encode_float32_(values.to(torch.float32, copy=True)).to(torch.uint8)


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the E2M1 value of each 4-bit code.

    Args:
        codes: uint8 tensor of codes in 0..15, any shape.
        dtype: output dtype. Every E2M1 value is exact in float32, bfloat16 and float16.

    Returns:
        Tensor of ``dtype`` with the shape of ``codes``.

    Raises:
        FormatError: if ``codes`` is not uint8 or contains a value above 15.
    """
    _check_codes(codes)
    table = signed_value_table(codes.device)
    return table[codes.to(torch.int32)].to(dtype)


def round_to_e2m1(values: torch.Tensor) -> torch.Tensor:
    """Round values to the nearest E2M1 value, ties to even, saturating at +-6.

    Args:
        values: float32, bfloat16 or float16 tensor of any shape.

    Returns:
        float32 tensor of the same shape.

    Raises:
        FormatError: if ``values`` has another dtype or contains NaN.
    """
    return decode(encode(values))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, element 2k in the low nibble of byte k.

    Args:
        codes: uint8 codes in 0..15, shape [..., n] with n even.

    Returns:
        uint8 tensor of shape [..., n / 2].

    Raises:
        FormatError: if ``codes`` is not uint8, contains a value above 15, or its last
            dimension is odd.
    """
    _check_codes(codes)
    if codes.ndim == 0 or codes.shape[-1] % 2 != 0:
        raise FormatError(
            f"cannot pack codes of shape {list(codes.shape)}: the last dimension must be "
            "even, because each byte contains two codes. Pad it to an even length"
        )
    return pack_int(codes)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Split each byte into two 4-bit codes, the low nibble first.

    Args:
        packed: uint8 tensor of shape [..., m].

    Returns:
        uint8 codes of shape [..., 2 * m].

    Raises:
        FormatError: if ``packed`` is not uint8 or is 0-dimensional.
    """
    if packed.dtype != torch.uint8 or packed.ndim == 0:
        raise FormatError(
            f"packed E2M1 data must be a uint8 tensor with at least one dimension, got "
            f"{packed.dtype} of shape {list(packed.shape)}"
        )

    low = packed & E2M1_CODE_MASK
    high = packed >> 4
    codes = torch.stack((low, high), dim=-1)  # [..., m, 2]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def encode_float32_(values: torch.Tensor) -> torch.Tensor:
    """Overwrite a float32 tensor with the E2M1 codes of its values, without input checks.

    Args:
        values: float32 tensor, modified in place. NaN gives an arbitrary code, so
            callers must exclude it.

    Returns:
        int32 view of the same storage, each element a code in 0..15.
    """
    values += 0.0  # turns -0.0 into +0.0 and leaves every other value unchanged
    bits = values.view(torch.int32)

    sign = bits >> 28  # arithmetic shift moves bit 31 to bit 3 (and fills above it)
    sign &= E2M1_SIGN_BIT

    bits &= _FLOAT32_ABS_MASK
    bits.clamp_(max=_E2M1_MAX_BITS)  # saturate at 6, Inf included

    subnormal_index = torch.clamp(bits.view(torch.float32), max=1.0)
    subnormal_index += _SUBNORMAL_ROUNDER
    subnormal_index = subnormal_index.view(torch.int32)
    subnormal_index -= _SUBNORMAL_ROUNDER_BITS  # round(2 * min(magnitude, 1)), 0..2

    kept_bit = bits >> _MANTISSA_DROP_BITS
    kept_bit &= 1
    bits += kept_bit
    bits += _NORMAL_ROUNDING_BIAS - (_EXPONENT_TO_INDEX_OFFSET << _MANTISSA_DROP_BITS)
    bits >>= _MANTISSA_DROP_BITS  # normal-path index, exact for magnitudes >= 1

    torch.maximum(subnormal_index, bits, out=bits)
    bits |= sign
    return bits


def pack_int(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes of shape [..., n], n even, into uint8 [..., n / 2], unchecked."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)  # [..., n / 2, 2]
    packed = pairs[..., 1] << 4
    packed |= pairs[..., 0]
    return packed.to(torch.uint8)


def signed_value_table(device: torch.device) -> torch.Tensor:
    """Return the float32 value of each code 0..15 on ``device``, with -0.0 for code 8."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat((magnitudes, -magnitudes))


def _check_no_nan(values: torch.Tensor) -> None:
    check_float_dtype(values, "E2M1 input")
    if bool(torch.isnan(values).any()):
        nan_count = int(torch.isnan(values).sum())
        raise FormatError(
            f"E2M1 input of shape {list(values.shape)} contains {nan_count} NaN values, but "
            f"E2M1 has no NaN code (Inf saturates to +-{E2M1_MAX:g}). Remove the NaN first"
        )


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dtype != torch.uint8:
        raise FormatError(f"E2M1 codes must be uint8, got {codes.dtype}")
    if codes.numel() > 0 and int(codes.max()) > E2M1_CODE_MASK:
        raise FormatError(
            f"E2M1 codes must be in 0..15, found {int(codes.max())}. Pass unpacked codes "
            "(see unpack) rather than packed bytes"
        )
