"""Low-level safetensors header parsing and serialisation.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, padded
with spaces), then the data buffer; offsets are relative to the start of the buffer. This
module validates headers strictly, so a damaged file fails here with its path named, before any
tensor is read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastic_cli.errors import CheckpointError

# safetensors dtype string -> (torch dtype name, bytes per element): the one dtype table of the
# project. It contains names rather than torch objects so that reading headers and slicing never
# import torch; elastic_cli.checkpoint.torch_dtypes maps the names to torch dtypes.
DTYPE_TABLE: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
DTYPE_SIZES: dict[str, int] = {name: size for name, (_, size) in DTYPE_TABLE.items()}

# Bytes per element -> the numpy integer dtype of that size. It stores a tensor's raw bits
# wherever only bits move (reading, cutting, writing), because numpy has no BF16 or FP8 dtypes.
BITS_DTYPES: dict[int, type[np.integer]] = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

# A header larger than this is treated as damage, not as a checkpoint (real ones are a few MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGNMENT = 8


@dataclass(frozen=True)
class TensorInfo:
    """Location of one tensor: file, dtype, shape and absolute byte range."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without reading tensor data.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The header, with absolute byte ranges per tensor.

    Raises:
        CheckpointError: If the file is missing, truncated, or its header is malformed.
    """
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file", "replace it with the safetensors file itself")
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path} is truncated ({file_size} bytes, less than the 8-byte header length)",
                    "download or copy the file again",
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path} has a header length of {header_len} bytes but the file has {file_size} bytes",
                    "the file is truncated or not a safetensors file; download or copy it again",
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}", "check the path and permissions") from error

    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError covers JSON and UTF-8 decoding errors
        raise CheckpointError(
            f"{path} has a corrupted header ({error.__class__.__name__})",
            "the file is damaged; download or copy it again",
        ) from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a header that is not a JSON object", "the file is damaged")

    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} has a '__metadata__' entry that is not an object", "the file is damaged")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, data_size)
    _check_layout(path, tensors, data_start, data_size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, data_start=data_start)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
    """Require the tensors to cover the data area exactly, back to back, as safetensors defines."""
    position = data_start
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = "overlap the previous tensor" if info.begin < position else "leave a gap before it"
            raise CheckpointError(
                f"{path}: the data offsets of tensor '{name}' {problem} (byte {info.begin - data_start})",
                "the file is damaged",
            )
        position = info.end
    if position != data_start + data_size:
        raise CheckpointError(
            f"{path} has {data_start + data_size - position} byte(s) after the last tensor",
            "the file is damaged or was appended to; download or copy it again",
        )


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry for tensor '{name}' is not an object", "the file is damaged")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(
            f"{path}: tensor '{name}' has dtype {dtype!r}",
            f"supported dtypes are {', '.join(DTYPE_SIZES)}",
        )
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise CheckpointError(f"{path}: tensor '{name}' has an invalid shape {shape!r}", "the file is damaged")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor '{name}' has invalid data offsets {offsets!r}", "the file is damaged")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} needs {expected}",
            "the file is damaged",
        )
    if offsets[1] > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor '{name}' ends at byte {data_start + offsets[1]} "
            f"but the file has {data_start + data_size} bytes",
            "download or copy the file again",
        )
    return TensorInfo(
        path=path,
        dtype=dtype,
        shape=tuple(shape),
        begin=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Serialise a safetensors header for tensors stored back to back in the given order.

    Args:
        entries: ``(name, dtype, shape)`` in data order.
        metadata: The ``__metadata__`` map (string values).

    Returns:
        The header bytes (length prefix, JSON, space padding to 8 bytes) and each tensor's size.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    sizes = []
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        sizes.append(size)
        offset += size
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    body += b" " * (-(8 + len(body)) % ALIGNMENT)
    return struct.pack("<Q", len(body)) + body, sizes
