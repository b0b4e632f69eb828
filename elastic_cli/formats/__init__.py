"""Reference numerics of the quantized weight formats: E2M1, NVFP4 and FP8 (E4M3).

``nvfp4`` and ``fp8`` hold pure quantize/dequantize pairs and scale functions, ``e2m1``
the 4-bit rounding and packing under NVFP4, and ``constants`` every limit with its
derivation. Invalid input raises ``errors.FormatError``.

Import the submodules themselves (``from elastic_cli.formats import fp8``): this package imports
none of them, so that code needing only ``constants`` (slicing) does not load torch.
"""
