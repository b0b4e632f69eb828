"""Cut arrays by keep indices: the gather at the core of slicing.

Slicing only moves bits, so arrays are handled as integers of the element size (``int16`` for
BF16, ``uint8`` for packed NVFP4 or FP8). numpy's ``take`` on those measured about 5x faster
than torch's ``index_select`` for column gathers of a BF16 matrix (torch 2.13, numpy 2.4, 2-core
x86 CPU), and numpy starts without torch's import cost.
"""

from __future__ import annotations

import math

import numpy as np

from elastic_cli.elastic.plan import Keep

# Keep lists that split into at most this many ascending runs are copied run by run, which is
# faster than a gather.
_MAX_RUNS = 64


# FP8 dtypes as (exponent bits, mantissa bits, exponent bias, largest finite value).
_FP8_LAYOUTS = {"F8_E4M3": (4, 3, 7, 448.0), "F8_E5M2": (5, 2, 15, 57344.0)}


def pad_bits(dtype: str, value: float) -> int:
    """Return the bits of ``value`` in the safetensors ``dtype``, for padding a cut array.

    Raises:
        ValueError: If ``value`` is not exactly representable in ``dtype``.
    """
    if value == 0.0 and not np.signbit(value):
        return 0
    floats = {"F64": (np.float64, np.int64), "F32": (np.float32, np.int32), "F16": (np.float16, np.int16)}
    if dtype in floats:
        float_type, int_type = floats[dtype]
        encoded = float_type(value)
        if float(encoded) == value:
            return int(encoded.view(int_type))
    elif dtype == "BF16":
        bits = int(np.float32(value).view(np.uint32))
        if float(np.float32(value)) == value and bits & 0xFFFF == 0:
            return int(np.uint16(bits >> 16).view(np.int16))
    elif dtype in _FP8_LAYOUTS:
        bits = _fp8_bits(value, *_FP8_LAYOUTS[dtype])
        if bits is not None:
            return bits
    raise ValueError(f"padding value {value} cannot be stored exactly as {dtype}")


def _fp8_bits(value: float, exponent_bits: int, mantissa_bits: int, bias: int, largest: float) -> int | None:
    """Encode a finite ``value`` as FP8 bits, or return ``None`` when it is not exact."""
    if not math.isfinite(value) or abs(value) > largest:
        return None
    sign = 0x80 if math.copysign(1.0, value) < 0 else 0
    magnitude = abs(value)
    if magnitude == 0.0:
        return sign
    fraction, exponent = math.frexp(magnitude)  # magnitude = fraction * 2**exponent, 0.5 <= fraction < 1
    biased = exponent - 1 + bias
    if biased >= 1:
        mantissa = (fraction * 2 - 1) * 2**mantissa_bits
        field = biased
    else:  # subnormal: magnitude = mantissa * 2**(1 - bias - mantissa_bits)
        mantissa = magnitude / 2 ** (1 - bias - mantissa_bits)
        field = 0
    if mantissa != int(mantissa) or field >= 2**exponent_bits:
        return None
    return sign | field << mantissa_bits | int(mantissa)


def _runs(keep: tuple[int, ...]) -> list[slice]:
    """Split ascending-run keep indices into slices; empty when there is padding or reordering."""
    runs: list[slice] = []
    start = 0
    for position in range(1, len(keep) + 1):
        if position == len(keep) or keep[position] != keep[position - 1] + 1:
            if keep[start] < 0:
                return []
            runs.append(slice(keep[start], keep[position - 1] + 1))
            start = position
    return runs


class ArrayCutter:
    """Applies keep indices to numpy arrays, caching the index arrays shared by many tensors.

    Keep tuples are cached by identity: a plan shares one tuple between every tensor cut along
    the same axis, so each index array is built once.
    """

    def __init__(self) -> None:
        # id(keep) -> (keep, index, padding positions or None, largest index)
        self._cache: dict[int, tuple[tuple[int, ...], slice | list[slice] | np.ndarray, np.ndarray | None, int]] = {}

    def _index(self, keep: tuple[int, ...]) -> tuple[slice | list[slice] | np.ndarray, np.ndarray | None, int]:
        cached = self._cache.get(id(keep))
        if cached is not None and cached[0] is keep:
            return cached[1], cached[2], cached[3]
        padding = None
        runs = _runs(keep)
        index: slice | list[slice] | np.ndarray
        if len(runs) == 1:
            index = runs[0]
        elif runs and len(runs) <= _MAX_RUNS:
            index = runs
        else:
            index = np.asarray(keep, dtype=np.intp)
            if (index < 0).any():
                padding = index >= 0
                index = index[padding]
        largest = max(keep, default=-1)
        self._cache[id(keep)] = (keep, index, padding, largest)
        return index, padding, largest

    def cut(self, array: np.ndarray, keep: tuple[Keep, ...], pad: int = 0) -> np.ndarray:
        """Keep the listed entries of each dimension; ``-1`` entries become ``pad``.

        Args:
            array: The source, any integer dtype (the bits of the stored dtype).
            keep: Per dimension, the source index of every kept entry (``-1`` pads), or ``None``
                to keep the dimension whole.
            pad: The padding entries' bits, from :func:`pad_bits`.

        Returns:
            The cut array. It may be a view of ``array`` (a single contiguous run of rows, or
            nothing cut); use ``numpy.ascontiguousarray`` before taking its bytes.
        """
        for dim, indices in enumerate(keep):
            if indices is None:
                continue
            index, padding, largest = self._index(indices)
            if largest >= array.shape[dim]:
                raise IndexError(f"keep index {largest} is out of range for dimension {dim} of size {array.shape[dim]}")
            before = (slice(None),) * dim
            if isinstance(index, slice):
                array = array[(*before, index)]
            elif isinstance(index, list):
                array = np.concatenate([array[(*before, run)] for run in index], axis=dim)
            elif padding is None:
                # The indices are checked above, so "clip" never clips; it skips numpy's
                # per-element bounds check, which measured about half the time of a gather.
                array = np.take(array, index, axis=dim, mode="clip")
            else:
                shape = list(array.shape)
                shape[dim] = len(indices)
                result = np.full(shape, pad, dtype=array.dtype)
                result[(*before, np.flatnonzero(padding))] = np.take(array, index, axis=dim, mode="clip")
                array = result
        return array
