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
        # id(keep) -> (keep, index array with -1 for padding), for cutting blocks of rows
        self._positions_cache: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}
        self._scratch_buffer = np.empty(0, dtype=np.uint8)

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

    def _check_range(self, keep: tuple[int, ...], size: int, dim: int) -> None:
        largest = self._index(keep)[2]
        if largest >= size:
            raise IndexError(f"keep index {largest} is out of range for dimension {dim} of size {size}")

    def _positions(self, keep: tuple[int, ...]) -> np.ndarray:
        """Return ``keep`` as an index array with padding entries still ``-1``, cached like :meth:`_index`."""
        cached = self._positions_cache.get(id(keep))
        if cached is not None and cached[0] is keep:
            return cached[1]
        positions = np.asarray(keep, dtype=np.intp)
        self._positions_cache[id(keep)] = (keep, positions)
        return positions

    def cut_rows(self, array: np.ndarray, keep: tuple[Keep, ...], pad: int, start: int, out: np.ndarray) -> None:
        """Write rows ``start:start + len(out)`` of the cut of ``array`` into ``out``.

        The result equals the same rows of :meth:`cut`, but nothing as large as the cut is
        allocated: a caller that cuts a large tensor block by block into a few reused buffers
        keeps its memory, and the caches that hold the blocks, small.

        Args:
            array: The source, any integer dtype (the bits of the stored dtype).
            keep: As for :meth:`cut`.
            pad: The padding entries' bits.
            start: The first output row (the first entry of dimension 0) to write.
            out: A C-contiguous array of ``array``'s dtype, shaped like those rows of the cut.
        """
        keep = tuple(keep) + (None,) * (array.ndim - len(keep))
        for dim, indices in enumerate(keep):
            if indices is not None:
                self._check_range(indices, array.shape[dim], dim)
        stop = start + out.shape[0]
        rest = keep[1:]
        last_cut = max((dim for dim, indices in enumerate(keep) if indices is not None), default=-1)
        padded_rows = None
        if keep[0] is None:
            rows = array[start:stop]
        else:
            index, _, _ = self._index(keep[0])
            if isinstance(index, slice):
                rows = array[index.start + start : index.start + stop]
            else:
                positions = self._positions(keep[0])[start:stop]
                if positions.size and positions.min() < 0:
                    padded_rows = positions < 0
                    if padded_rows.all():
                        out[...] = pad
                        return
                    # Any real row will do for a padded one: padded rows are overwritten below.
                    positions = np.where(padded_rows, positions.max(), positions)
                target = out if last_cut == 0 else self._scratch((len(positions), *array.shape[1:]), array.dtype)
                rows = np.take(array, positions, axis=0, mode="clip", out=target)
        if last_cut <= 0:
            if rows is not out:
                np.copyto(out, rows)
        else:
            partial = self.cut(rows, (None, *rest[: last_cut - 1]), pad) if last_cut > 1 else rows
            self._cut_last(partial, last_cut, keep[last_cut], pad, out)
        if padded_rows is not None:
            out[padded_rows] = pad

    def _cut_last(self, array: np.ndarray, dim: int, keep: tuple[int, ...], pad: int, out: np.ndarray) -> None:
        """Cut ``array`` along ``dim``, its last cut dimension, straight into ``out``."""
        index, padding, _ = self._index(keep)
        before = (slice(None),) * dim
        if isinstance(index, slice):
            np.copyto(out, array[(*before, index)])
        elif isinstance(index, list):
            written = 0
            for run in index:
                width = run.stop - run.start
                np.copyto(out[(*before, slice(written, written + width))], array[(*before, run)])
                written += width
        elif padding is None:
            np.take(array, index, axis=dim, mode="clip", out=out)
        else:
            out[...] = pad
            out[(*before, np.flatnonzero(padding))] = np.take(array, index, axis=dim, mode="clip")

    def _scratch(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Return a reused array of ``shape`` for rows gathered before the columns are cut."""
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if self._scratch_buffer.nbytes < size:
            self._scratch_buffer = np.empty(size, dtype=np.uint8)
        return self._scratch_buffer[:size].view(dtype).reshape(shape)

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
            index, padding, _ = self._index(indices)
            self._check_range(indices, array.shape[dim], dim)
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
