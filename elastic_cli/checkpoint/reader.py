"""Lazy checkpoint reader: config and headers first, tensor bytes on demand.

Opening a checkpoint reads ``config.json``, the shard index (or the single ``model.safetensors``)
and every shard header; it reads no tensor data. :meth:`Checkpoint.read` then loads one tensor at
a time, so memory stays bounded by the largest tensor, and :meth:`Checkpoint.map_array` maps one
without reading it. Only :meth:`read` and :meth:`read_rows`, which return torch tensors, import
torch, so slicing starts without it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from elastic_cli.arch.nemotron_h import natural_key
from elastic_cli.checkpoint.safetensors_io import BITS_DTYPES, DTYPE_SIZES, TensorInfo, read_header

if TYPE_CHECKING:
    import torch
from elastic_cli.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, raising :class:`CheckpointError` with the path on any failure."""
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file", "replace it with the JSON file itself")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise CheckpointError(f"{what} not found: {path}", "check the checkpoint folder") from error
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}", "check permissions") from error
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text", "fix or restore the file") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})",
            "fix or restore the file",
        ) from error
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} cannot be parsed: {error.__class__.__name__}", "fix or restore the file") from error


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def check_inside(trust_root: Path, path: Path) -> None:
    """Reject a checkpoint file that is a link resolving outside ``trust_root`` (absent files pass)."""
    if path.exists() and not _inside(trust_root, path):
        raise CheckpointError(
            f"{path.name} resolves to {path.resolve()}, outside the checkpoint folder {trust_root}",
            "replace the link with the file itself",
        )


@dataclass
class Checkpoint:
    """A checkpoint folder opened lazily.

    Attributes:
        root: The checkpoint folder.
        config: The parsed ``config.json``.
        tensors: Every tensor name mapped to its location, in natural name order.
        shard_names: The shard file names, as the index lists them.
        trust_root: The folder every file must resolve inside (a Hugging Face cache's repo
            folder for hub checkpoints, whose snapshot files are links into ``blobs/``).
    """

    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    shard_names: tuple[str, ...]
    trust_root: Path
    _handles: dict[Path, BinaryIO] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: Path, trust_root: Path | None = None) -> "Checkpoint":
        """Open a checkpoint folder, reading the config, the index and every shard header.

        Args:
            root: Folder with ``config.json`` and ``model.safetensors`` or a sharded index.
            trust_root: Folder every file must resolve inside; defaults to ``root``.

        Raises:
            CheckpointError: If a file is missing, damaged, or the index and the shards disagree.
        """
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {root}", "pass a folder or a Hugging Face repo id")
        trust = (trust_root or root).resolve()
        for name in ("config.json", INDEX_NAME, "elastic_config.json"):
            check_inside(trust, root / name)
        config = read_json(root / "config.json", "config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{root / 'config.json'} is not a JSON object", "fix or restore the file")

        index_path = root / INDEX_NAME
        if index_path.exists():
            weight_map = _read_index(index_path)
        elif (root / SINGLE_NAME).exists():
            weight_map = None
        else:
            raise CheckpointError(
                f"{root} has neither {SINGLE_NAME} nor {INDEX_NAME}",
                "elastic reads safetensors checkpoints; convert .bin weights first",
            )

        shard_names = tuple(sorted(set(weight_map.values()))) if weight_map is not None else (SINGLE_NAME,)
        tensors: dict[str, TensorInfo] = {}
        for shard in shard_names:
            path = root / shard
            if not path.exists():
                raise CheckpointError(f"shard {shard} listed in {INDEX_NAME} is missing from {root}", "download it again")
            check_inside(trust, path)
            if not path.is_file():
                raise CheckpointError(f"shard {shard} is not a regular file", "replace it with the safetensors file itself")
            header = read_header(path)
            for name, info in header.tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"tensor '{name}' appears in both {tensors[name].path.name} and {shard}",
                        "the checkpoint is damaged; remove the duplicate shard",
                    )
                if weight_map is not None and weight_map.get(name) != shard:
                    listed = weight_map.get(name)
                    where = f"lists it in {listed}" if listed else "does not list it"
                    raise CheckpointError(
                        f"shard {shard} contains tensor '{name}' but {INDEX_NAME} {where}",
                        "the index and the shards disagree; download the checkpoint again",
                    )
                tensors[name] = info

        if weight_map is not None:
            missing = sorted(name for name in weight_map if name not in tensors)
            if missing:
                raise CheckpointError(
                    f"{INDEX_NAME} names {len(missing)} tensor(s) absent from their shards, e.g. '{missing[0]}' "
                    f"in {weight_map[missing[0]]}",
                    "the index and the shards disagree; download the checkpoint again",
                )
        ordered = {name: tensors[name] for name in sorted(tensors, key=natural_key)}
        return cls(root=root, config=config, tensors=ordered, shard_names=shard_names, trust_root=trust)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk into a new CPU tensor with its stored dtype and shape."""
        import torch

        from elastic_cli.checkpoint.torch_dtypes import TORCH_DTYPES

        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
        return torch.from_numpy(self._read_raw(name)).view(TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def read_bytes(self, name: str) -> memoryview:
        """Read one tensor's raw little-endian bytes."""
        if self.tensors[name].nbytes == 0:
            return memoryview(b"")
        return memoryview(self._read_raw(name))

    def read_rows(self, name: str, rows: tuple[int, ...]) -> torch.Tensor:
        """Read only some rows (entries of dimension 0) of a tensor, in the given order.

        Consecutive rows are read as one range, so a prefix or a few blocks cost a few reads.
        """
        import torch

        from elastic_cli.checkpoint.torch_dtypes import TORCH_DTYPES

        info = self.tensors[name]
        row_bytes = math.prod(info.shape[1:]) * DTYPE_SIZES[info.dtype]
        flat = np.empty(len(rows) * row_bytes, dtype=np.uint8)
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            length = (end - start) * row_bytes
            self._read_into(name, info.begin + rows[start] * row_bytes, flat[start * row_bytes : start * row_bytes + length])
            start = end
        return torch.from_numpy(flat).view(TORCH_DTYPES[info.dtype]).reshape(len(rows), *info.shape[1:])

    def map_array(self, name: str) -> np.ndarray:
        """Map one tensor's bytes into memory, read-only, without reading them.

        The array contains the stored bits as integers of the element size (``int16`` for BF16),
        shaped like the tensor. Pages come from the page cache as they are touched, so cutting
        a mapped tensor copies each kept byte once and reads no dropped row. The mapping
        outlives :meth:`close` and ends when the last array using it is freed.

        Raises:
            CheckpointError: If the shard is now shorter than its header says.
        """
        info = self.tensors[name]
        bits = BITS_DTYPES[DTYPE_SIZES[info.dtype]]
        if info.nbytes == 0:
            return np.empty(info.shape, dtype=bits)
        handle = self._handle(info.path)
        size = os.fstat(handle.fileno()).st_size
        if size < info.end:
            raise CheckpointError(
                f"{info.path} ended after {max(size - info.begin, 0)} of {info.nbytes} bytes of tensor '{name}'",
                "the file changed or is truncated; download or copy it again",
            )
        # The offset of a mapping must be a multiple of the allocation granularity. A file cut
        # short while it is mapped ends the process with SIGBUS on the lost pages, so only the
        # damage done before this call is caught by the size check above.
        start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(handle.fileno(), info.end - start, access=mmap.ACCESS_READ, offset=start)
        except OSError as error:
            if error.errno == errno.ENOMEM:
                raise MemoryError(f"mapping tensor '{name}' ({info.nbytes} bytes) exceeds the memory limit") from error
            raise CheckpointError(f"cannot map {info.path}: {error.strerror or error}", "check the file") from error
        return np.frombuffer(mapping, dtype=bits, count=info.numel, offset=info.begin - start).reshape(info.shape)

    def _read_raw(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        buffer = np.empty(info.nbytes, dtype=np.uint8)  # no zero fill, unlike bytearray
        self._read_into(name, info.begin, buffer)
        return buffer

    def _handle(self, path: Path) -> BinaryIO:
        handle = self._handles.get(path)
        if handle is None:
            handle = path.open("rb", buffering=0)
            self._handles[path] = handle
        return handle

    def _read_into(self, name: str, offset: int, buffer: np.ndarray) -> None:
        info = self.tensors[name]
        handle = self._handle(info.path)
        handle.seek(offset)
        view = memoryview(buffer)
        got = 0
        while got < len(view):
            count = handle.readinto(view[got:])
            if not count:
                break
            got += count
        if got != len(view):
            raise CheckpointError(
                f"{info.path} ended after {got} of {len(view)} bytes of tensor '{name}'",
                "the file changed or is truncated; download or copy it again",
            )

    def close(self) -> None:
        """Close every shard file this reader opened."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def _read_index(path: Path) -> dict[str, str]:
    index = read_json(path, INDEX_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise CheckpointError(f"{path} has no valid 'weight_map'", "fix or restore the index file")
    for shard in set(weight_map.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{path} names shard {shard!r}, which is not a plain file name",
                "shards must lie in the checkpoint folder itself",
            )
    return weight_map
