"""Reference numerics of the quantized weight formats: E2M1, NVFP4 and FP8 (E4M3).

``nvfp4`` and ``fp8`` hold pure quantize/dequantize pairs and scale functions, ``e2m1``
the 4-bit rounding and packing under NVFP4, and ``constants`` every limit with its
derivation. Invalid input raises ``FormatError``.
"""

from elastic_cli.formats import constants, e2m1, fp8, nvfp4
from elastic_cli.formats.errors import FormatError

__all__ = ["FormatError", "constants", "e2m1", "fp8", "nvfp4"]
