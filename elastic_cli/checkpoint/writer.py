"""Streaming sharded safetensors writer.

The shard layout is planned from names, dtypes and shapes alone, so every header is known before
the first tensor byte is written: each tensor goes straight from memory to its shard, and memory
stays bounded by one tensor. Shards use Hugging Face names (``model-00001-of-00003.safetensors``,
or ``model.safetensors`` when one shard suffices) and carry ``format: pt`` metadata; the index is
written last, with ``total_size`` equal to the summed tensor bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from elastic_cli.checkpoint.reader import INDEX_NAME, SINGLE_NAME
from elastic_cli.checkpoint.safetensors_io import DTYPES, TORCH_TO_DTYPE, encode_header
from elastic_cli.errors import OutputError

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ShardLayout:
    """Assignment of tensors to shard files, in write order.

    Attributes:
        shards: ``(file name, ((tensor name, dtype, shape), ...))`` per shard.
    """

    shards: tuple[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]], ...]

    @property
    def total_size(self) -> int:
        return sum(
            math.prod(shape) * DTYPES[dtype][1] for _, entries in self.shards for _, dtype, shape in entries
        )

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: file for file, entries in self.shards for name, _, _ in entries}


def plan_shards(entries: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ShardLayout:
    """Assign tensors, in the given order, to shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own.
    """
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    current = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPES[dtype][1]
        if groups[-1] and current + size > max_shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append((name, dtype, tuple(shape)))
        current += size
    count = len(groups)
    if count == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]
    return ShardLayout(shards=tuple((names[i], tuple(group)) for i, group in enumerate(groups)))


class ShardedWriter:
    """Write the tensors of a :class:`ShardLayout` into a folder, strictly in layout order.

    Use as a context manager; :meth:`finish` closes the last shard and writes the index. A tensor
    that arrives out of order or with the wrong shape or dtype raises immediately, naming it.

    With a resume journal, shards it records as finished are not written again (their tensors
    are checked for order and skipped), and each shard is recorded as it closes.
    """

    def __init__(self, folder: Path, layout: ShardLayout, journal: Any = None, prefix: str = "") -> None:
        self.folder = folder
        self.layout = layout
        self._journal = journal
        self._prefix = prefix  # the folder's path inside the journal's folder, "" or "budget/"
        self._done = {file for file, _ in layout.shards if journal is not None and journal.is_done(prefix + file)}
        self._weight_map = layout.weight_map
        self._queue = [(file, entry) for file, entries in layout.shards for entry in entries]
        self._position = 0
        self._handle: BinaryIO | None = None
        self._file: str | None = None
        self._hash = hashlib.sha256()
        # shard file -> (sha256, size), filled as shards close (or from the journal when reused)
        self.digests: dict[str, tuple[str, int]] = {file: journal.done[prefix + file] for file in self._done}

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def is_done(self, name: str) -> bool:
        """True when the tensor's shard was finished by an earlier, interrupted run."""
        return self._weight_map.get(name) in self._done

    @property
    def next_name(self) -> str | None:
        """Name of the tensor the writer expects next, or ``None`` when all are written."""
        if self._position >= len(self._queue):
            return None
        return self._queue[self._position][1][0]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; it must be the next one of the layout."""
        self.write_bytes(name, TORCH_TO_DTYPE.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape), tensor_bytes(tensor))

    def write_bytes(
        self, name: str, dtype: str, shape: tuple[int, ...], data: bytes | bytearray | memoryview | None
    ) -> None:
        """Append one tensor given as raw little-endian bytes (``None`` only for a finished shard's tensor)."""
        if self._position >= len(self._queue):
            raise OutputError(f"tensor '{name}' was not planned for this output", "this is a bug in elastic; please report it")
        file, (expected_name, expected_dtype, expected_shape) = self._queue[self._position]
        if (name, dtype, tuple(shape)) != (expected_name, expected_dtype, expected_shape):
            raise OutputError(
                f"tensor '{name}' {dtype}{list(shape)} does not match the plan, which expects "
                f"'{expected_name}' {expected_dtype}{list(expected_shape)}",
                "this is a bug in elastic; please report it",
            )
        if file in self._done:
            self._position += 1
            return
        if file != self._file:
            self._open_shard(file)
        assert self._handle is not None
        try:
            self._handle.write(data)
        except OSError as error:
            raise output_error(self.folder / file, error) from error
        self._hash.update(data)
        self._size += memoryview(data).nbytes
        self._position += 1

    def _open_shard(self, file: str) -> None:
        self._close_shard()
        entries = dict(self.layout.shards)[file]
        header, _ = encode_header(list(entries), SHARD_METADATA)
        path = self.folder / file
        try:
            self._handle = path.open("wb")
            self._handle.write(header)
        except OSError as error:
            raise output_error(path, error) from error
        self._file = file
        self._hash = hashlib.sha256(header)
        self._size = len(header)

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise output_error(Path(self._handle.name), error) from error
        finally:
            self._handle.close()
            self._handle = None
        assert self._file is not None
        self.digests[self._file] = (self._hash.hexdigest(), self._size)
        if self._journal is not None:
            self._journal.record(self._prefix + self._file, *self.digests[self._file])

    def finish(self) -> None:
        """Close the last shard and write the index (only when there is more than one shard)."""
        if self._position != len(self._queue):
            missing = self._queue[self._position][1][0]
            raise OutputError(f"output is incomplete: tensor '{missing}' was never written", "this is a bug in elastic")
        self._close_shard()
        if len(self.layout.shards) > 1:
            index = {"metadata": {"total_size": self.layout.total_size}, "weight_map": dict(sorted(self.layout.weight_map.items()))}
            write_text(self.folder / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Return a contiguous CPU tensor's bytes without copying them."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_text(path: Path, text: str) -> None:
    """Write a text file, turning OS failures into :class:`OutputError`."""
    try:
        with path.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise output_error(path, error) from error


def output_error(path: Path, error: OSError) -> OutputError:
    """Describe a failed write: the path, the reason and what to do.

    A path inside a run's hidden work folder (``.NAME.resume-KEY``) is reported at its final
    place, ``NAME``, because the work folder is renamed or removed before the user reads it.
    """
    parts = list(path.parts)
    for index, part in enumerate(parts):
        if part.startswith(".") and ".resume-" in part:
            parts[index] = part[1 : part.index(".resume-")]
    path = Path(*parts)
    if error.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device while writing {path}", "free space or choose another --output")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: {error.strerror}", "choose a writable --output folder")
    return OutputError(f"writing {path} failed: {error.strerror or error}", "check the output folder")
