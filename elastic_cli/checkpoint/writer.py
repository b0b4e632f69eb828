"""Streaming sharded safetensors writer.

The shard layout is planned from names, dtypes and shapes alone, so every header is known before
the first tensor byte is written: each tensor goes straight from memory to its shard, and memory
stays bounded by one tensor. Shards use Hugging Face names (``model-00001-of-00003.safetensors``,
or ``model.safetensors`` when one shard suffices) and carry ``format: pt`` metadata; the index is
written last, with ``total_size`` equal to the summed tensor bytes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import platform
import queue
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from elastic_cli.checkpoint.reader import INDEX_NAME, SINGLE_NAME
from elastic_cli.checkpoint.safetensors_io import DTYPE_SIZES, encode_header
from elastic_cli.errors import CheckpointError, OutputError

if TYPE_CHECKING:
    import torch

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
            math.prod(shape) * DTYPE_SIZES[dtype] for _, entries in self.shards for _, dtype, shape in entries
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
        size = math.prod(shape) * DTYPE_SIZES[dtype]
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


class WritePipeline:
    """Hashes and writes shard bytes on two background threads, in submission order.

    The caller goes on preparing the next tensor while earlier ones are hashed (SHA-256, for the
    manifest) and written, so reading, cutting, hashing and writing overlap. Data waiting in
    the pipeline is bounded by ``max_pending_bytes``; one larger item is always admitted alone.
    After each write the kernel is asked to start writing the new pages to disk, and a third
    thread flushes each shard to stable storage every ``_FLUSH_BYTES`` (see :class:`_Flusher`),
    so the ``fsync`` that closes a shard finds little left to do.

    Use as a context manager around every writer that shares it. Leaving it waits until the
    queued work is done, after an exception too, so that no thread touches the output folder
    afterwards. Once a task has failed, the rest is skipped. ``threads=False`` runs every task
    at once in the calling thread.

    The threads report each finished task through a queue, and the caller holds no lock that
    they need. SIGINT and SIGTERM raise exceptions in the caller's thread at any point, and a
    lock left held by such an exception would stop the threads for good.
    """

    def __init__(self, max_pending_bytes: int = 16 * 1024 * 1024, threads: bool = True) -> None:
        self._limit = max_pending_bytes
        self._submitted = 0  # bytes handed to each lane
        self._finished = [0, 0]  # bytes each lane has finished
        self._acks: queue.SimpleQueue = queue.SimpleQueue()  # (lane index, bytes or marker)
        self._error: BaseException | None = None
        self._lanes: list[_Lane] = []
        self.flusher: _Flusher | None = None
        if threads:
            _share_malloc_arena()
            previous = threading.stack_size(_THREAD_STACK_BYTES)
            try:
                self._lanes = [_Lane(self, 0, "hash"), _Lane(self, 1, "write")]
                if _START_WRITEBACK is not None:
                    self.flusher = _Flusher()
            finally:
                threading.stack_size(previous)

    def __enter__(self) -> "WritePipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        for lane in self._lanes:
            lane.stop()
        self._lanes = []
        if self.flusher is not None:
            self.flusher.stop()
            self.flusher = None
        if exc[0] is None:
            self.check()

    def check(self) -> None:
        """Raise the first error a task raised."""
        if self._error is not None:
            raise self._error

    def submit(self, hash_task: Callable[[], None], write_task: Callable[[], None], size: int = 0) -> None:
        """Queue one task for each thread; ``size`` bytes count as pending until both ran."""
        self.check()
        if not self._lanes:
            self._run(hash_task)
            self._run(write_task)
            self.check()
            return
        while not self._acks.empty():
            self._collect(block=False)
        while self._pending and self._pending + size > self._limit and self._error is None:
            self._collect(block=True)
        self._submitted += size
        self._lanes[0].put(hash_task, size)
        self._lanes[1].put(write_task, size)

    @property
    def _pending(self) -> int:
        return self._submitted - min(self._finished)

    @property
    def submitted(self) -> int:
        """Bytes submitted so far: a mark that :meth:`wait_until` can wait for."""
        return self._submitted

    def wait_until(self, mark: int) -> None:
        """Wait until both threads have finished the first ``mark`` submitted bytes (or skipped them after a failure)."""
        while self._lanes and min(self._finished) < mark:
            self._collect(block=True)

    def _collect(self, block: bool, marker: object = None) -> bool:
        """Count one finished task, if any; return True when it was ``marker`` coming back."""
        try:
            lane, done = self._acks.get(block=block)
        except queue.Empty:
            return False
        if isinstance(done, int):
            self._finished[lane] += done
            return False
        return done is marker

    def wait(self) -> None:
        """Wait until every queued task has run (or was skipped after a failure)."""
        marker = object()
        for lane in self._lanes:
            lane.put(None, marker)
        returned = 0
        while returned < len(self._lanes):
            returned += self._collect(block=True, marker=marker)

    def drain(self) -> None:
        """Wait until every queued task has run, then raise the first error."""
        self.wait()
        self.check()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _run(self, task: Callable[[], None] | None) -> None:
        if task is None or self._error is not None:
            return
        try:
            task()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread by check()
            if self._error is None:
                self._error = error


# The lanes run shallow Python code; glibc's default 8 MB stack would count against ulimit -v.
_THREAD_STACK_BYTES = 1024 * 1024
_M_ARENA_MAX = -8  # mallopt() parameter number in glibc's malloc.h


def _share_malloc_arena() -> None:
    """Make threads allocate from glibc's main arena instead of one new arena each.

    glibc reserves 64 MB of address space for each thread's first allocation, so two lanes
    would take 128 MB of a ``ulimit -v`` cap for a few small objects. The setting lasts for the
    rest of the process. Other C libraries have no such arenas; there this does nothing.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


class BufferRing:
    """A few reused buffers for data on its way through a :class:`WritePipeline`.

    A producer that cuts a large tensor block by block into these buffers needs no memory of
    the tensor's size, and the pipeline's threads hash and write each block while it is still
    in the processor's caches. A buffer is handed out again only after the pipeline has
    finished everything submitted while it was last in use.
    """

    def __init__(self, pipeline: WritePipeline, buffers: int = 4, buffer_bytes: int = 4 * 1024 * 1024) -> None:
        self._pipeline = pipeline
        self.buffer_bytes = buffer_bytes
        self._buffers = [np.empty(buffer_bytes, dtype=np.uint8) for _ in range(buffers)]
        self._marks = [0] * buffers
        self._next = 0
        self._handed: int | None = None  # the buffer handed out last, whose data is now submitted

    def take(self, nbytes: int) -> np.ndarray:
        """Return a free ``uint8`` array of ``nbytes``. Its data must be submitted before the next call.

        A request larger than a buffer gets a new array of its own, never reused.
        """
        if self._handed is not None:
            self._marks[self._handed] = self._pipeline.submitted
            self._handed = None
        if nbytes > self.buffer_bytes:
            return np.empty(nbytes, dtype=np.uint8)
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        self._pipeline.wait_until(self._marks[slot])
        self._handed = slot
        return self._buffers[slot][:nbytes]


class _Lane:
    """One daemon thread that runs tasks in order and acknowledges each one in the pipeline's queue."""

    def __init__(self, pipeline: WritePipeline, index: int, name: str) -> None:
        self._pipeline = pipeline
        self._index = index
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"elastic-{name}", daemon=True)
        self._thread.start()

    def put(self, task: Callable[[], None] | None, ack: object) -> None:
        """Queue ``task``, or ``None`` for no work. The lane then reports ``ack``, a byte count or a marker."""
        self._queue.put((task, ack))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            task, ack = item
            self._pipeline._run(task)
            self._pipeline._acks.put((self._index, ack))


class _Flusher:
    """A daemon thread that makes written shard data durable while later data is still produced.

    Without it, the ``fsync`` that closes a shard waits at the end while the disk persists the
    whole shard. On a virtual disk with a write-back cache, that took 0.9 s for a 1.07 GB shard
    whose data had already left the page cache. Requests that arrive while a flush runs are
    merged, one per file.

    Each flush opens the file anew, on a file description of its own. Since Linux 4.13 every
    open file description keeps its own cursor into a file's writeback errors (``errseq_t``),
    so an error that a flush reports is reported again by the ``fsync`` on the writer's
    descriptor. Errors are therefore ignored here.
    """

    def __init__(self) -> None:
        self._wanted: dict[Path, None] = {}  # files to flush, in request order
        self._stopping = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="elastic-flush", daemon=True)
        self._thread.start()

    def request(self, path: Path) -> None:
        """Ask for ``path``'s written data to be flushed to stable storage soon; return at once."""
        with self._condition:
            self._wanted[path] = None
            self._condition.notify()

    def forget(self, path: Path) -> None:
        """Drop a waiting request for ``path``, whose writer is about to ``fsync`` it itself."""
        with self._condition:
            self._wanted.pop(path, None)

    def stop(self) -> None:
        """Drop the waiting requests and wait for a running flush to end."""
        with self._condition:
            self._stopping = True
            self._wanted.clear()
            self._condition.notify()
        self._thread.join()

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._wanted and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                path = next(iter(self._wanted))
                del self._wanted[path]
            try:
                descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue  # the file was discarded
            try:
                os.fdatasync(descriptor)
            except OSError:
                pass  # the fsync on the writer's own descriptor reports this error
            finally:
                os.close(descriptor)


class ShardedWriter:
    """Write the tensors of a :class:`ShardLayout` into a folder, strictly in layout order.

    Use as a context manager; :meth:`finish` closes the last shard and writes the index. A tensor
    that arrives out of order or with the wrong shape or dtype raises immediately, naming it.

    With a :class:`WritePipeline`, hashing and file writes run on its threads and ``digests``
    is complete after :meth:`finish`; without one, they run at once in the calling thread.

    With a resume journal, shards it records as finished are not written again (their tensors
    are checked for order and skipped), and each shard is recorded as it closes.
    """

    def __init__(
        self, folder: Path, layout: ShardLayout, journal: Any = None, prefix: str = "", pipeline: WritePipeline | None = None
    ) -> None:
        self.folder = folder
        self.layout = layout
        self._journal = journal
        self._prefix = prefix  # the folder's path inside the journal's folder, "" or "budget/"
        self._pipeline = pipeline if pipeline is not None else WritePipeline(threads=False)
        self._done = {file for file, _ in layout.shards if journal is not None and journal.is_done(prefix + file)}
        self._weight_map = layout.weight_map
        self._queue = [(file, entry) for file, entries in layout.shards for entry in entries]
        self._position = 0
        self._file: str | None = None  # the open shard, as the caller sees it
        self._hash = hashlib.sha256()
        self._size = 0
        self._handle: BinaryIO | None = None  # used by the pipeline's write thread only
        self._written = 0
        self._kicked = 0
        self._flushed = 0
        # shard file -> (sha256, size), filled as shards close (or from the journal when reused)
        self.digests: dict[str, tuple[str, int]] = {file: journal.done[prefix + file] for file in self._done}

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._pipeline.wait()  # the write thread may still hold the open shard
        if self._handle is not None:
            # The shard is unfinished, so it is discarded. A failed write (a full disk) can leave
            # bytes in the file object's buffer, which would fail again as it closes.
            _close_quietly(self._handle)
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
        """Append one torch tensor; it must be the next one of the layout."""
        from elastic_cli.checkpoint.torch_dtypes import TORCH_TO_DTYPE

        self.write_bytes(name, TORCH_TO_DTYPE.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape), tensor_bytes(tensor))

    def write_array(self, name: str, dtype: str, array: np.ndarray) -> None:
        """Append one tensor given as a numpy array of its raw bits, in safetensors ``dtype``."""
        self.write_bytes(name, dtype, array.shape, memoryview(np.ascontiguousarray(array)).cast("B"))

    def write_bytes(
        self, name: str, dtype: str, shape: tuple[int, ...], data: bytes | bytearray | memoryview | None
    ) -> None:
        """Append one tensor given as raw little-endian bytes (``None`` only for a finished shard's tensor).

        With a pipeline, ``data`` must not change until :meth:`finish` returns.
        """
        self.write_parts(name, dtype, shape, () if data is None else (data,))

    def write_parts(
        self, name: str, dtype: str, shape: tuple[int, ...], parts: Iterable[bytes | bytearray | memoryview | np.ndarray]
    ) -> None:
        """Append one tensor given as consecutive pieces of its raw bytes.

        ``parts`` is consumed lazily, one piece submitted before the next is drawn, so a
        generator may fill the buffers of a :class:`BufferRing` as it goes. A piece must not
        change until the pipeline has finished it. For a tensor of a shard that an earlier run
        finished, ``parts`` is not consumed.
        """
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
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        received = 0
        for part in parts:
            view = memoryview(part).cast("B")
            received += view.nbytes
            if received > expected:
                break
            self._pipeline.submit(functools.partial(self._hash.update, view), functools.partial(self._write, file, view), view.nbytes)
        if received != expected:
            raise OutputError(
                f"tensor '{name}' {dtype}{list(shape)} came with {received} bytes instead of {expected}",
                "this is a bug in elastic; please report it",
            )
        self._size += expected
        self._position += 1

    def _open_shard(self, file: str) -> None:
        self._close_shard()
        entries = dict(self.layout.shards)[file]
        header, _ = encode_header(list(entries), SHARD_METADATA)
        self._file = file
        self._hash = hashlib.sha256(header)
        self._size = len(header)
        self._pipeline.submit(_nothing, functools.partial(self._create, file, header))

    def _close_shard(self) -> None:
        if self._file is None:
            return
        file, digest, size = self._file, self._hash, self._size
        self._file = None
        hashed = threading.Event()
        result: list[str] = []

        def finish_hash() -> None:
            result.append(digest.hexdigest())
            hashed.set()

        def finish_file() -> None:
            self._fsync_and_close(file)
            while not hashed.wait(0.1):
                if self._pipeline.failed:
                    return
            self.digests[file] = (result[0], size)
            if self._journal is not None:
                self._journal.record(self._prefix + file, *self.digests[file])

        self._pipeline.submit(finish_hash, finish_file)

    def _create(self, file: str, header: bytes) -> None:
        path = self.folder / file
        try:
            self._handle = path.open("wb")
            self._handle.write(header)
        except OSError as error:
            raise output_error(path, error) from error
        self._written = len(header)
        self._kicked = 0  # bytes whose writeback has been started
        self._flushed = 0  # bytes up to the last flush request

    def _write(self, file: str, data: memoryview) -> None:
        assert self._handle is not None
        try:
            self._handle.write(data)
        except OSError as error:
            if error.errno == errno.EFAULT:
                # The data maps a source file that lost those pages: it was cut short mid-run.
                raise CheckpointError(
                    "a checkpoint file was truncated or replaced while elastic read it",
                    "copy or download the checkpoint again and leave it unchanged during the run",
                ) from error
            raise output_error(self.folder / file, error) from error
        self._written += data.nbytes
        if _START_WRITEBACK is not None and self._written - self._kicked >= _WRITEBACK_BYTES:
            # Start writing the new pages to disk now; dirty pages are not dropped by this advice.
            self._handle.flush()
            os.posix_fadvise(self._handle.fileno(), self._kicked, self._written - self._kicked, _START_WRITEBACK)
            self._kicked = self._written
            flusher = self._pipeline.flusher
            if flusher is not None and self._written - self._flushed >= _FLUSH_BYTES:
                flusher.request(self.folder / file)
                self._flushed = self._written

    def _fsync_and_close(self, file: str) -> None:
        assert self._handle is not None
        if self._pipeline.flusher is not None:
            self._pipeline.flusher.forget(self.folder / file)
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            _close_quietly(self._handle)
            self._handle = None
            raise output_error(self.folder / file, error) from error
        self._handle.close()
        self._handle = None

    def finish(self) -> None:
        """Close the last shard, wait for the pipeline and write the index (for several shards)."""
        if self._position != len(self._queue):
            missing = self._queue[self._position][1][0]
            raise OutputError(f"output is incomplete: tensor '{missing}' was never written", "this is a bug in elastic")
        self._close_shard()
        self._pipeline.drain()
        if len(self.layout.shards) > 1:
            index = {"metadata": {"total_size": self.layout.total_size}, "weight_map": dict(sorted(self.layout.weight_map.items()))}
            write_text(self.folder / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


# POSIX_FADV_DONTNEED on freshly written pages starts their writeback on Linux without waiting
# for it. Other systems skip the advice and the flushes, and fsync still writes everything. The
# advice is given for every 4 MiB written: in a 4.13 GB slice, 4 MiB beat 32 MiB and no advice at
# all by about 4% and 9% of the wall time (five alternating runs each). A flush every 64 MiB took
# the 1.07 GB slice of that checkpoint from 2.41-2.70 s to 1.79-2.09 s (four alternating runs),
# and left the 7.43 GB slice of all its budgets unchanged.
_START_WRITEBACK = getattr(os, "POSIX_FADV_DONTNEED", None) if sys.platform.startswith("linux") else None
_WRITEBACK_BYTES = 4 * 1024 * 1024
_FLUSH_BYTES = 64 * 1024 * 1024


def _records_finished_files(work: Path) -> bool:
    """Return whether the resume journal in ``work`` lists at least one finished file."""
    from elastic_cli.checkpoint.resume import JOURNAL  # resume imports this module

    try:
        document = json.loads((work / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and bool(document.get("done"))


def _nothing() -> None:
    pass


def _close_quietly(handle: BinaryIO) -> None:
    """Close a file whose data is being discarded, ignoring the errors of flushing its buffer."""
    try:
        handle.close()
    except OSError:
        pass


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Return a contiguous CPU tensor's bytes without copying them."""
    import torch

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
    place, ``NAME``, because the work folder is renamed, or removed unless it keeps finished
    shards, before the user reads it. A full disk's hint names the work folder only when its
    journal records finished shards.
    """
    parts = list(path.parts)
    work = None
    for index, part in enumerate(parts):
        if part.startswith(".") and ".resume-" in part:
            work = Path(*parts[: index + 1])
            parts[index] = part[1 : part.index(".resume-")]
    path = Path(*parts)
    if error.errno == errno.ENOSPC:
        hint = "free space or choose another --output"
        if work is not None and _records_finished_files(work):
            hint += f"; shards already finished stay in {work} for the next run, which reuses them (delete it to free their space)"
        return OutputError(f"no space left on the device while writing {path}", hint)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: {error.strerror}", "choose a writable --output folder")
    return OutputError(f"writing {path} failed: {error.strerror or error}", "check the output folder")
