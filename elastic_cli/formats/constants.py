"""Numeric constants of the E2M1, E4M3, NVFP4 and FP8 formats, with their derivations.

Every other module in ``elastic_cli.formats`` takes its limits from here, so a value is
written once and its reason sits next to it.
"""

# E2M1 (FP4): 1 sign bit, 2 exponent bits with bias 1, 1 mantissa bit, no Inf or NaN.
# Exponent field 0 is subnormal: 0.m * 2**0 gives 0 and 0.5.
# Exponent fields 1..3 are normal: 1.m * 2**(e - 1) gives 1, 1.5, 2, 3, 4, 6.
E2M1_MAGNITUDES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Non-negative E2M1 values, indexed by the low 3 bits of a code (exponent and mantissa)."""

E2M1_MAX = 6.0
"""Largest E2M1 magnitude: exponent field 3, mantissa 1, so 1.5 * 2**2."""

E2M1_SIGN_BIT = 0b1000
"""Sign bit of a 4-bit E2M1 code. Bits 0-2 index ``E2M1_MAGNITUDES``."""

E2M1_CODE_MASK = 0b1111
"""Mask of one 4-bit E2M1 code inside a byte."""

# E4M3 (float8_e4m3fn): 1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits.
# The "fn" variant has no Inf, and only the all-ones pattern S.1111.111 is NaN, so the
# largest finite value is S.1111.110 = 1.75 * 2**(15 - 7) = 448.
E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn magnitude."""

E4M3_MIN_SUBNORMAL = 2.0**-9
"""Smallest positive float8_e4m3fn value: 0.001 * 2**(1 - 7) = 2**-3 * 2**-6."""

E4M3_NAN_BITS = 0x7F
"""Low 7 bits of a float8_e4m3fn NaN byte (0x7F or 0xFF), which no finite value has."""

# NVFP4: E2M1 elements in blocks of 16 along the input dimension, one E4M3 block scale
# per block and one fp32 global scale per tensor. A value is
# element * block_scale * global_scale.
NVFP4_BLOCK_SIZE = 16
"""Elements per block scale, counted along the last (input) dimension."""

NVFP4_GLOBAL_SCALE_DIVISOR = E2M1_MAX * E4M3_MAX
"""2688.0. The global scale is amax / 2688, so the block that holds amax gets block scale
448, the top of E4M3, and its largest element maps to 6, the top of E2M1."""

NVFP4_BLOCK_SCALE_MIN = E4M3_MIN_SUBNORMAL
"""Lower clamp of a block scale before the E4M3 cast, so a small block never rounds to a
zero scale."""

NVFP4_BLOCK_SCALE_MAX = E4M3_MAX
"""Upper clamp of a block scale before the E4M3 cast, so no value passed to the cast
exceeds the largest finite E4M3 value."""

NVFP4_EMPTY_BLOCK_SCALE = 1.0
"""Block scale stored for a block whose scale computes to zero (an all-zero block)."""

# FP8 per-tensor: float8_e4m3fn elements and one fp32 scale, value = element * scale.
FP8_SCALE_DIVISOR = E4M3_MAX
"""448.0. The per-tensor scale is amax / 448, so amax maps to the top of E4M3."""

ZERO_AMAX_SCALE = 1.0
"""Scale returned for amax == 0 (an all-zero tensor). Any positive finite scale
quantizes zeros to zero bytes, and 1.0 keeps the stored scale readable."""

FP32_MIN_NORMAL = 2.0**-126
"""Smallest normal float32. Scales below it are rejected, because a subnormal scale
loses precision and an NVFP4 block scale times a subnormal global scale can underflow
to zero."""
