"""The background write pipeline: same bytes as writing inline, bounded, errors surface, threads end."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from elastic_cli.checkpoint import writer as writer_module
from elastic_cli.checkpoint.writer import BufferRing, ShardedWriter, WritePipeline, plan_shards
from elastic_cli.errors import OutputError


def lane_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("elastic-")]


def write_all(folder: Path, arrays: dict[str, np.ndarray], pipeline: WritePipeline | None) -> dict[str, tuple[str, int]]:
    layout = plan_shards([(name, "I16", array.shape) for name, array in arrays.items()], max_shard_bytes=3000)
    folder.mkdir()
    with ShardedWriter(folder, layout, pipeline=pipeline) as writer:
        for name, array in arrays.items():
            writer.write_array(name, "I16", array)
        writer.finish()
    return writer.digests


def test_threaded_bytes_equal_inline(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {f"t{index}": rng.integers(-30000, 30000, size=(17, 13 + index)).astype(np.int16) for index in range(12)}
    # A non-contiguous view is written as its contiguous copy.
    arrays["t12"] = rng.integers(0, 9, size=(20, 20)).astype(np.int16)[:, ::2]

    inline = write_all(tmp_path / "inline", arrays, None)
    with WritePipeline(max_pending_bytes=1000) as pipeline:
        threaded = write_all(tmp_path / "threaded", arrays, pipeline)

    assert len(inline) > 1, "the layout should span several shards"
    assert threaded == inline
    for file, (digest, size) in threaded.items():
        data = (tmp_path / "threaded" / file).read_bytes()
        assert data == (tmp_path / "inline" / file).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (digest, size)
    assert not lane_threads(), "the pipeline's threads outlived it"


def test_pending_bytes_are_bounded():
    release = threading.Event()
    ran: list[str] = []
    with WritePipeline(max_pending_bytes=100) as pipeline:
        pipeline.submit(lambda: ran.append("hash 1"), lambda: (release.wait(10), ran.append("write 1")), 80)
        second = threading.Thread(target=pipeline.submit, args=(lambda: ran.append("hash 2"), lambda: ran.append("write 2"), 80))
        second.start()
        time.sleep(0.3)
        # The second item would exceed the bound while the first is still pending, so it waits
        # even though the hash thread is idle.
        assert "hash 2" not in ran
        release.set()
        second.join(10)
        pipeline.drain()
    assert ran.index("write 1") < ran.index("write 2")
    assert sorted(ran) == ["hash 1", "hash 2", "write 1", "write 2"]


def test_oversized_item_admitted_alone():
    ran: list[int] = []
    with WritePipeline(max_pending_bytes=10) as pipeline:
        pipeline.submit(lambda: None, lambda: ran.append(1), 1000)
        pipeline.submit(lambda: None, lambda: ran.append(2), 1000)
        pipeline.drain()
    assert ran == [1, 2]


def test_failed_write_stops_the_rest():
    ran: list[str] = []

    def failing() -> None:
        raise OutputError("no space left on the device while writing out/model.safetensors", "free space")

    with pytest.raises(OutputError, match="no space left"):
        with WritePipeline() as pipeline:
            pipeline.submit(lambda: None, failing, 10)
            pipeline.submit(lambda: ran.append("hash after"), lambda: ran.append("write after"), 10)
            pipeline.drain()
    assert ran == [] or ran == ["hash after"], "work after the failure was written"
    assert not lane_threads()


class FullDisk:
    """A file handle whose data writes fail as on a full file system."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_disk_full_names_the_shard(tmp_path, monkeypatch):
    original = ShardedWriter._write

    def write(self, file, data):
        self._handle = FullDisk(self._handle)
        original(self, file, data)

    monkeypatch.setattr(ShardedWriter, "_write", write)
    layout = plan_shards([("a", "I16", (4,))])
    with pytest.raises(OutputError, match=r"no space left on the device while writing .*model\.safetensors"):
        with WritePipeline() as pipeline, ShardedWriter(tmp_path, layout, pipeline=pipeline) as writer:
            writer.write_array("a", "I16", np.zeros(4, dtype=np.int16))
            writer.finish()
    assert not lane_threads()


def test_queued_work_finishes_after_caller_error(tmp_path):
    """An interrupted run keeps the shards it queued, so that a resumed run can reuse them."""
    ran: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with WritePipeline() as pipeline:
            pipeline.submit(lambda: time.sleep(0.2), lambda: ran.append("write"), 10)
            raise KeyboardInterrupt
    assert ran == ["write"]
    assert not lane_threads()


def test_ring_reuse_waits_for_pipeline(tmp_path, monkeypatch):
    """Blocks cut into a two-buffer ring reach the file intact while the write thread lags."""
    original = ShardedWriter._write

    def slow_write(self, file, data):
        time.sleep(0.01)
        original(self, file, data)

    monkeypatch.setattr(ShardedWriter, "_write", slow_write)
    rng = np.random.default_rng(9)
    arrays = {f"t{index}": rng.integers(-30000, 30000, size=(40, 25)).astype(np.int16) for index in range(3)}
    layout = plan_shards([(name, "I16", array.shape) for name, array in arrays.items()])
    with WritePipeline() as pipeline, ShardedWriter(tmp_path, layout, pipeline=pipeline) as writer:
        ring = BufferRing(pipeline, buffers=2, buffer_bytes=500)

        def blocks(array):
            for start in range(0, len(array), 10):
                out = ring.take(10 * 25 * 2).view(np.int16).reshape(10, 25)
                out[...] = array[start : start + 10]
                yield out

        for name, array in arrays.items():
            writer.write_parts(name, "I16", array.shape, blocks(array))
        writer.finish()
    assert (tmp_path / "model.safetensors").read_bytes().endswith(b"".join(array.tobytes() for array in arrays.values()))


def test_ring_gives_a_larger_request_its_own_array():
    with WritePipeline(threads=False) as pipeline:
        ring = BufferRing(pipeline, buffers=1, buffer_bytes=8)
        small = ring.take(8)
        large = ring.take(9)
        assert large.nbytes == 9
        assert not np.shares_memory(small, large)


@pytest.mark.parametrize("parts", [[b"\0" * 6], [b"\0" * 10], [b"\0" * 4, b"\0" * 6]], ids=["short", "long", "long in parts"])
def test_parts_of_wrong_size_rejected(tmp_path, parts):
    layout = plan_shards([("a", "I16", (4,))])
    with pytest.raises(OutputError, match=r"tensor 'a' I16\[4\] came with \d+ bytes instead of 8"):
        with ShardedWriter(tmp_path, layout) as writer:
            writer.write_parts("a", "I16", (4,), parts)


class RecordingFlusher:
    """A stand-in for the flush thread that records the writer's requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def request(self, path: Path) -> None:
        self.calls.append(("request", path.name))

    def forget(self, path: Path) -> None:
        self.calls.append(("forget", path.name))

    def stop(self) -> None:
        pass


@pytest.mark.skipif(writer_module._START_WRITEBACK is None, reason="flushes during writing run on Linux only")
def test_shard_flushes_requested_while_written(tmp_path, monkeypatch):
    """Each shard gets a flush request while it is written and loses it before its own fsync. The bytes are unchanged."""
    monkeypatch.setattr(writer_module, "_WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(writer_module, "_FLUSH_BYTES", 2000)
    rng = np.random.default_rng(5)
    arrays = {f"t{index}": rng.integers(-30000, 30000, size=(40, 30)).astype(np.int16) for index in range(6)}

    inline = write_all(tmp_path / "inline", arrays, None)
    flusher = RecordingFlusher()
    with WritePipeline() as pipeline:
        pipeline.flusher.stop()  # the real flush thread, replaced by the recorder
        pipeline.flusher = flusher
        threaded = write_all(tmp_path / "threaded", arrays, pipeline)

    assert threaded == inline
    expected = [(call, file) for file in sorted(threaded) for call in ("request", "forget")]
    assert flusher.calls == expected
    assert not lane_threads(), "the pipeline's threads outlived it"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names flushed files through /proc")
def test_flusher_skips_missing_files_and_stops(tmp_path, monkeypatch):
    started = threading.Event()
    release = threading.Event()
    flushed: list[str] = []

    def slow_fdatasync(descriptor: int) -> None:
        flushed.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")).name)
        started.set()
        release.wait(10)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    present = tmp_path / "present.bin"
    present.write_bytes(b"data")
    flusher = writer_module._Flusher()
    flusher.request(tmp_path / "missing.bin")
    flusher.request(present)
    assert started.wait(10), "the flush of the present file never started"

    forgotten = tmp_path / "forgotten.bin"
    forgotten.write_bytes(b"data")
    flusher.request(forgotten)
    flusher.forget(forgotten)
    flusher.request(present)  # waits behind the running flush and is dropped by stop()
    stopper = threading.Thread(target=flusher.stop)
    stopper.start()
    release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert not lane_threads()
    assert flushed == ["present.bin"]
