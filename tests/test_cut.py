"""The array cutter against plain per-entry indexing, and padding bits against hand-computed values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from elastic_cli.elastic.cut import ArrayCutter, pad_bits
from elastic_cli.elastic.tensor_cut import TensorCutter


def reference_cut(array: np.ndarray, keep: tuple, pad: int) -> np.ndarray:
    """Cut entry by entry with Python loops: the definition the cutter must match."""
    shape = [array.shape[dim] if indices is None else len(indices) for dim, indices in enumerate(keep)]
    result = np.empty(shape, dtype=array.dtype)
    for position in itertools.product(*(range(size) for size in shape)):
        source = []
        padded = False
        for dim, index in enumerate(position):
            indices = keep[dim]
            entry = index if indices is None else indices[index]
            padded = padded or entry < 0
            source.append(entry)
        result[position] = pad if padded else array[tuple(source)]
    return result


KEEPS = {
    "prefix": (0, 1, 2, 3),
    "one run inside": (2, 3, 4, 5, 6),
    "three runs": (0, 1, 4, 5, 7),
    "scattered": (6, 0, 3, 1),
    "padded": (0, 2, -1, -1),
    "padded run": (0, 1, 2, -1),
    "everything": tuple(range(8)),
    "nothing": (),
}


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64])
@pytest.mark.parametrize("rows", sorted(KEEPS), ids=str)
@pytest.mark.parametrize("columns", sorted(KEEPS), ids=str)
def test_cut_matches_reference(dtype, rows, columns):
    array = np.random.default_rng(7).integers(0, 100, size=(8, 8)).astype(dtype)
    keep = (KEEPS[rows], KEEPS[columns])
    got = ArrayCutter().cut(array, keep, pad=-1 if dtype != np.uint8 else 255)
    expected = reference_cut(array, keep, -1 if dtype != np.uint8 else 255)
    assert got.dtype == expected.dtype
    assert np.array_equal(got, expected)


def test_cut_three_dimensions():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    keep = (None, (4, 0, -1), (1, 2, 3))
    assert np.array_equal(ArrayCutter().cut(array, keep, pad=0), reference_cut(array, keep, 0))


def cut_in_blocks(array: np.ndarray, keep: tuple, pad: int, rows_per_block: int) -> np.ndarray:
    """Assemble a cut from ``cut_rows`` blocks written into one reused buffer, as the slicer does."""
    cutter = ArrayCutter()
    whole = cutter.cut(array, keep, pad)
    blocks = []
    buffer = np.empty((rows_per_block, *whole.shape[1:]), dtype=array.dtype)
    for start in range(0, whole.shape[0], rows_per_block):
        out = buffer[: min(rows_per_block, whole.shape[0] - start)]
        out[...] = 99  # stale data from an earlier block must be overwritten
        cutter.cut_rows(array, keep, pad, start, out)
        blocks.append(out.copy())
    return np.concatenate(blocks) if blocks else whole


@pytest.mark.parametrize("rows_per_block", [1, 3, 8])
@pytest.mark.parametrize("rows", sorted(KEEPS), ids=str)
@pytest.mark.parametrize("columns", sorted(KEEPS), ids=str)
def test_cut_rows_matches_reference(rows, columns, rows_per_block):
    array = np.random.default_rng(11).integers(0, 90, size=(8, 8)).astype(np.int16)
    keep = (KEEPS[rows], KEEPS[columns])
    got = cut_in_blocks(array, keep, -1, rows_per_block)
    assert np.array_equal(got, reference_cut(array, keep, -1))


@pytest.mark.parametrize(
    "keep",
    [
        (None, (4, 0, -1), (1, 2, 3)),
        ((3, -1, 0), None, (5, 0)),
        ((1, 2), (0, 1, 2, 3, 4), None),
        ((0, 1, 2, 3), (4, 2), (0, 1, 4, 5)),
        ((-1, 2), (0, 3), (-1, 1)),
        (None, None, (5, 4, 3)),
        (None,),
    ],
    ids=str,
)
@pytest.mark.parametrize("rows_per_block", [1, 2, 5])
def test_cut_rows_three_dimensions(keep, rows_per_block):
    array = np.random.default_rng(5).integers(0, 1000, size=(4, 5, 6)).astype(np.int32)
    assert np.array_equal(cut_in_blocks(array, keep, -7, rows_per_block), reference_cut(array, keep + (None,) * (3 - len(keep)), -7))


def test_cut_rows_all_padding_empty_source():
    array = np.empty((0, 3), dtype=np.int16)
    out = np.zeros((2, 3), dtype=np.int16)
    ArrayCutter().cut_rows(array, ((-1, -1), None), 5, 0, out)
    assert (out == 5).all()


@pytest.mark.parametrize("keep", [((0, 8), None), (None, (8,)), ((2, -1, 9), (0,))])
def test_cut_rows_out_of_range_index_raises(keep):
    out = np.empty((1, 1), dtype=np.int16)
    with pytest.raises(IndexError, match="out of range"):
        ArrayCutter().cut_rows(np.zeros((8, 8), dtype=np.int16), keep, 0, 0, out)


def test_index_cache_keyed_by_tuple():
    cutter = ArrayCutter()
    array = np.arange(8, dtype=np.int32)
    first = (1, 3)
    assert cutter.cut(array, (first,)).tolist() == [1, 3]
    second = (5, 6)
    assert cutter.cut(array, (second,)).tolist() == [5, 6]
    assert cutter.cut(array, (first,)).tolist() == [1, 3]


@pytest.mark.parametrize("keep", [(0, 8), (8,), (0, 1, 2, 3, 4, 5, 6, 7, 8), (2, -1, 9)])
def test_out_of_range_index_raises(keep):
    with pytest.raises(IndexError, match="out of range"):
        ArrayCutter().cut(np.arange(8, dtype=np.int16), (keep,))


@pytest.mark.parametrize(
    ("dtype", "value", "bits"),
    [
        ("BF16", 0.0, 0),
        ("BF16", 1.0, 0x3F80),
        ("BF16", -2.0, -0x4000),  # 0xC000 as int16
        ("BF16", -0.0, -0x8000),  # sign bit only
        ("F16", 1.0, 0x3C00),
        ("F32", 1.0, 0x3F800000),
        ("F64", -1.0, -0x4010000000000000),  # 0xBFF0000000000000 as int64
        ("F8_E4M3", 0.0, 0),
        ("F8_E4M3", 1.0, 0x38),
        ("F8_E4M3", -1.0, 0xB8),
        ("F8_E4M3", 448.0, 0x7E),
        ("F8_E4M3", 2.0**-9, 0x01),  # the smallest subnormal
        ("F8_E4M3", 0.875 * 2.0**-6, 0x07),  # the largest subnormal
        ("F8_E5M2", 1.0, 0x3C),
        ("F8_E5M2", 57344.0, 0x7B),
        ("U8", 0.0, 0),
    ],
)
def test_pad_bits_by_hand(dtype, value, bits):
    assert pad_bits(dtype, value) == bits


@pytest.mark.parametrize(
    ("dtype", "value"),
    [("BF16", 1.1), ("F16", 1e-10), ("F8_E4M3", 1.1), ("F8_E4M3", 480.0), ("F8_E4M3", 2.0**-10), ("I32", 3.0)],
)
def test_pad_bits_rejects_inexact_values(dtype, value):
    with pytest.raises(ValueError, match=dtype):
        pad_bits(dtype, value)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)])
def test_fp8_pad_bits_match_torch(dtype, torch_dtype):
    every_value = torch.arange(256, dtype=torch.uint8).view(torch_dtype).float()
    for bits, value in enumerate(every_value.tolist()):
        if value != value or value in (float("inf"), float("-inf")):
            continue
        if value == 0.0 and bits == 0x80:  # -0.0 compares equal to 0.0; its own bits follow
            assert pad_bits(dtype, -0.0) == 0x80
            continue
        assert pad_bits(dtype, value) == bits, f"{dtype} {value}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.uint8])
def test_tensor_cutter_matches_entries(dtype):
    source = torch.randn(6, 10).to(dtype) if dtype != torch.uint8 else torch.randint(0, 255, (6, 10), dtype=torch.uint8)
    keep = ((5, 0, -1), (1, 2, 3, 9))
    cut = TensorCutter().cut(source, keep, pad_value=0.0)
    assert cut.dtype == dtype
    assert cut.shape == (3, 4)
    assert cut.is_contiguous()
    for row, source_row in enumerate(keep[0]):
        for column, source_column in enumerate(keep[1]):
            expected = 0.0 if source_row < 0 else source[source_row, source_column].float().item()
            assert cut[row, column].float().item() == expected
