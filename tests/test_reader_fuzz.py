"""Fuzz the safetensors reader: any file gives a CheckpointError or tensors that all read back.

The generators feed ``read_header`` and ``Checkpoint.open`` plus ``Checkpoint.read`` with random
bytes, with valid files damaged by byte flips, truncations, appended bytes and replaced JSON
fields, and with headers built from random dtypes, shapes and offsets. Any exception other than
``CheckpointError`` fails the test, and so does a file that opens but has a tensor outside the
data area or one that reads back with the wrong dtype, shape or bytes.

The runs are derandomized, so every run tries the same examples. Inputs too large or too deep
for the generators (5000-digit integers, 100000-deep JSON) have fixed tests at the end.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.checkpoint.safetensors_io import DTYPE_SIZES, encode_header, read_header
from elastic_cli.checkpoint.torch_dtypes import TORCH_DTYPES
from elastic_cli.errors import CheckpointError

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._\u00b2", min_size=1, max_size=24).filter(
    lambda name: name != "__metadata__"
)
SHAPE = st.lists(st.integers(0, 5), min_size=0, max_size=3)
JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder whose ``model.safetensors`` each example overwrites."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "config.json").write_text("{}\n")
    return root


def encode_file(entries: list[tuple[str, str, tuple[int, ...]]], data: bytes) -> bytes:
    """Return a safetensors file of ``entries`` stored back to back, followed by ``data``'s bytes."""
    header, _ = encode_header(entries, {"format": "pt"})
    return header + data


@st.composite
def valid_files(draw: st.DrawFn) -> bytes:
    """A well-formed safetensors file of up to four small tensors with random bytes."""
    names = draw(st.lists(NAME, min_size=0, max_size=4, unique=True))
    entries = [(name, draw(st.sampled_from(sorted(DTYPE_SIZES))), tuple(draw(SHAPE))) for name in names]
    size = sum(math.prod(shape) * DTYPE_SIZES[dtype] for _, dtype, shape in entries)
    return encode_file(entries, draw(st.binary(min_size=size, max_size=size)))


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_file(header: Any, payload: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + payload


@st.composite
def flipped_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_files()))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] ^= draw(st.integers(1, 255))
    return bytes(data)


@st.composite
def truncated_or_extended(draw: st.DrawFn) -> bytes:
    data = draw(valid_files())
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data)))]
    return data + draw(st.binary(min_size=1, max_size=64))


@st.composite
def replaced_fields(draw: st.DrawFn) -> bytes:
    """A valid file with one header field replaced by another JSON value."""
    header, payload = split_file(draw(valid_files()))
    names = [name for name in header if name != "__metadata__"]
    target = draw(st.sampled_from(["__metadata__", "tensor", "dtype", "shape", "data_offsets"])) if names else "__metadata__"
    if target == "__metadata__":
        header["__metadata__"] = draw(JSON_VALUE)
    elif target == "tensor":
        header[draw(st.sampled_from(names))] = draw(JSON_VALUE)
    elif target == "dtype":
        header[draw(st.sampled_from(names))]["dtype"] = draw(JSON_VALUE | st.sampled_from(sorted(DTYPE_SIZES)))
    else:
        header[draw(st.sampled_from(names))][target] = draw(JSON_VALUE)
    return join_file(header, payload)


@st.composite
def random_headers(draw: st.DrawFn) -> bytes:
    """Headers of random dtypes, shapes and offsets over a random data area."""
    header: dict[str, Any] = {}
    for name in draw(st.lists(NAME, max_size=4, unique=True)):
        header[name] = {
            "dtype": draw(st.sampled_from([*sorted(DTYPE_SIZES), "F4", "bf16", ""])),
            "shape": draw(st.lists(st.integers(-2, 6), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(-4, 160), min_size=0, max_size=3)),
        }
    return join_file(header, draw(st.binary(max_size=160)))


def check_reader(folder: Path, data: bytes) -> None:
    """Write ``data`` as the folder's only shard and check the reader's contract on it."""
    shard = folder / "model.safetensors"
    shard.write_bytes(data)

    try:
        header = read_header(shard)
    except CheckpointError:
        header = None
    if header is not None:
        for name, info in header.tensors.items():
            assert header.data_start <= info.begin <= info.end <= len(data), f"tensor {name!r} lies outside the file"
            assert info.nbytes == info.numel * DTYPE_SIZES[info.dtype], f"tensor {name!r} has the wrong byte count"

    try:
        checkpoint = Checkpoint.open(folder)
    except CheckpointError:
        assert header is None, "read_header accepted the shard but Checkpoint.open rejected it"
        return
    assert header is not None, "Checkpoint.open accepted a shard that read_header rejected"
    with checkpoint:
        assert sorted(checkpoint.tensors) == sorted(header.tensors), "Checkpoint.open lists other tensors"
        for name, info in checkpoint.tensors.items():
            tensor = checkpoint.read(name)
            assert tensor.dtype == TORCH_DTYPES[info.dtype], f"tensor {name!r} read back as {tensor.dtype}"
            assert tuple(tensor.shape) == info.shape, f"tensor {name!r} read back with shape {tuple(tensor.shape)}"
            assert checkpoint.read_bytes(name) == data[info.begin : info.end], f"tensor {name!r} read other bytes"


@FUZZ_SETTINGS
@given(data=st.binary(max_size=256))
def test_random_bytes(folder, data):
    check_reader(folder, data)


@FUZZ_SETTINGS
@given(body=st.binary(max_size=256), trailer=st.binary(max_size=64))
def test_random_header_bytes(folder, body, trailer):
    """Random bytes behind a length prefix that matches them, so the JSON parser reads them."""
    check_reader(folder, struct.pack("<Q", len(body)) + body + trailer)


@FUZZ_SETTINGS
@given(data=valid_files())
def test_valid_files_read_back(folder, data):
    check_reader(folder, data)
    assert read_header(folder / "model.safetensors") is not None


@FUZZ_SETTINGS
@given(data=flipped_bytes())
def test_flipped_bytes(folder, data):
    check_reader(folder, data)


@FUZZ_SETTINGS
@given(data=truncated_or_extended())
def test_truncated_or_extended(folder, data):
    check_reader(folder, data)


@FUZZ_SETTINGS
@given(data=replaced_fields())
def test_replaced_json_fields(folder, data):
    check_reader(folder, data)


@FUZZ_SETTINGS
@given(data=random_headers())
def test_random_shapes_and_offsets(folder, data):
    check_reader(folder, data)


def test_valid_file_tensor_values(folder):
    """A fixed file, so a reader that fuzzing cannot break still has to return the right values."""
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    check_reader(folder, encode_file([("w", "F32", (3, 4))], values.numpy().tobytes()))

    with Checkpoint.open(folder) as checkpoint:
        assert torch.equal(checkpoint.read("w"), values)


def prefixed(body: bytes) -> bytes:
    """Return ``body`` behind a length prefix that matches it, as the header of a shard."""
    return struct.pack("<Q", len(body)) + body


REJECTED_INPUTS = [
    pytest.param(
        join_file({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        id="dtype-list",
    ),
    pytest.param(
        prefixed(b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"4" * 5000 + b"]}}"),
        id="int-5000-digits",
    ),
    pytest.param(
        prefixed(b"[" * 100_000 + b"]" * 100_000),
        id="json-nested-100000-deep",
    ),
    pytest.param(
        join_file(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            bytes(4),
        ),
        id="overlapping-offsets",
    ),
]


@pytest.mark.parametrize("data", REJECTED_INPUTS)
def test_reader_rejects_input(folder, data):
    """Reject the inputs that the generators leave out, each with a CheckpointError."""
    (folder / "model.safetensors").write_bytes(data)

    with pytest.raises(CheckpointError):
        read_header(folder / "model.safetensors")
        Checkpoint.open(folder).close()


def test_reader_accepts_non_ascii_digit_name(folder):
    """A name part such as a superscript digit is not a layer number; the header still reads."""
    (folder / "model.safetensors").write_bytes(
        join_file({"layers.\u00b2": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    )

    assert list(read_header(folder / "model.safetensors").tensors) == ["layers.\u00b2"]
