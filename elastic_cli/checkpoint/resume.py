"""Resumable output folders: an interrupted run continues where it stopped.

A run writes into ``.NAME.resume-KEY`` beside its destination, where ``KEY`` hashes everything
that decides the output bytes (input headers, file sizes and modification times, config, masks,
options). Each finished shard is recorded, with its sha256, in a journal inside that folder.
When a run fails or is interrupted, unfinished files are removed and finished shards stay; the
next run with the same key re-checks their hashes and writes only what is missing. A run with
another key (changed inputs or options) removes the old folder and starts fresh. On success the
folder is renamed to the destination in one step.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elastic_cli.checkpoint.manifest import file_digest
from elastic_cli.checkpoint.output import check_destination, hidden_name, replace_destination
from elastic_cli.checkpoint.writer import output_error
from elastic_cli.errors import OutputError

log = logging.getLogger(__name__)

JOURNAL = ".elastic-resume.json"
RESUME_MARKER = ".resume-"


def run_key(payload: Any) -> str:
    """Hash a JSON-serialisable description of a run into a resume key."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_fingerprint(root: Path, tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Describe a checkpoint's inputs cheaply: tensor headers, shard sizes and modification times."""
    files = sorted({info.path for info in tensors.values()})
    return {
        "tensors": [[name, info.dtype, list(info.shape), info.path.name, info.begin, info.end] for name, info in tensors.items()],
        "files": [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files],
        "config": config,
        "masks": _stat(root / "elastic_config.json"),
    }


def _stat(path: Path) -> list[int] | None:
    if not path.exists():
        return None
    return [path.stat().st_size, path.stat().st_mtime_ns]


class Journal:
    """The finished files of a resumable run, with their sha256, and saved intermediate results."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.key = key
        self.done: dict[str, tuple[str, int]] = {}
        self.extra: dict[str, Any] = {}

    @classmethod
    def load(cls, folder: Path, key: str) -> "Journal":
        """Load and re-check a journal; files whose bytes changed are dropped from it."""
        journal = cls(folder, key)
        path = folder / JOURNAL
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return journal
        if document.get("key") != key:
            return journal
        for name, (sha256, size) in document.get("done", {}).items():
            file = folder / name
            if file.is_file() and file_digest(file) == (sha256, size):
                journal.done[name] = (sha256, size)
            else:
                log.info("resume: %s is missing or changed and will be written again", name)
        journal.extra = dict(document.get("extra", {}))
        if journal.done:
            log.info("resume: reusing %d finished file(s) from an interrupted run", len(journal.done))
        return journal

    def is_done(self, name: str) -> bool:
        return name in self.done

    def record(self, name: str, sha256: str, size: int) -> None:
        """Mark a file finished (``name`` relative to the folder) and save the journal."""
        self.done[name] = (sha256, size)
        self._save()

    def save_extra(self, key: str, value: Any) -> None:
        """Keep an intermediate result (such as calibration amax values) for a resumed run."""
        self.extra[key] = value
        self._save()

    def _save(self) -> None:
        document = {"key": self.key, "done": dict(sorted(self.done.items())), "extra": self.extra}
        temp = self.folder / (JOURNAL + ".tmp")
        try:
            temp.write_text(json.dumps(document, sort_keys=True), encoding="utf-8")
            os.replace(temp, self.folder / JOURNAL)
        except OSError as error:
            raise output_error(self.folder / JOURNAL, error) from error

    def discard_unfinished(self) -> None:
        """Remove every file that is not recorded as finished (the shard being written, configs)."""
        for path in sorted(self.folder.rglob("*"), reverse=True):
            relative = path.relative_to(self.folder).as_posix()
            if path.is_file() and relative != JOURNAL and relative not in self.done:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the journal before the folder becomes the finished artifact."""
        (self.folder / JOURNAL).unlink(missing_ok=True)


@contextmanager
def resumable_folder(output: Path, overwrite: bool, key: str, inputs: tuple[Path, ...] = ()) -> Iterator[Journal]:
    """Yield the journal of a work folder that replaces ``output`` when the block completes.

    On failure or interrupt, unfinished files are removed and finished ones kept for the next
    run with the same key. ``output`` may neither be nor contain one of ``inputs``.
    """
    check_destination(output, overwrite, inputs)
    _COMMIT.started = False
    work = output.parent / hidden_name(output, f"{RESUME_MARKER}{key[:16]}")
    try:
        work.mkdir()
        created = True
    except FileExistsError:
        created = False
    except OSError as error:
        raise OutputError(f"cannot write output {output}: {error.strerror or error}", "choose a writable --output folder") from error
    # The lock is taken before anything is removed, so a run that loses the race to another
    # run writing the same output leaves that run's files alone.
    lock = _lock_folder(work, output)
    try:
        for stale in output.parent.glob(hidden_name(output, f"{RESUME_MARKER}*")):
            if stale == work:
                continue
            try:
                os.close(_lock_folder(stale, output))
            except OutputError:
                if created:
                    shutil.rmtree(work, ignore_errors=True)
                raise
            log.info("removing %s: inputs or options changed since that run", stale.name)
            shutil.rmtree(stale, ignore_errors=True)
        journal = Journal.load(work, key)
        try:
            yield journal
            journal.close()
            _COMMIT.started = True
            replace_destination(work, output, overwrite)
        except BaseException:
            journal.discard_unfinished()
            if not journal.done:
                shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        os.close(lock)


class _CommitState:
    """Whether this process has begun to move a finished output into place."""

    started = False


_COMMIT = _CommitState()


def commit_started() -> bool:
    """Return True once a finished output is being moved into place.

    From then on the output is complete or about to be, so the command line lets an interrupt
    pass and exits 0 instead of reporting that nothing was written.
    """
    return _COMMIT.started


def _lock_folder(folder: Path, output: Path) -> int:
    """Take an exclusive lock on a work folder and return its descriptor, held until closed.

    Raises:
        OutputError: If another process holds the lock, because it is writing the same output.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise output_error(folder, error) from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in _NO_LOCKS:
            # NOTE: some network and FUSE file systems have no locks, so concurrent runs on one
            # output are not detected there.
            log.debug("no lock on %s: %s", folder, error.strerror)
            return descriptor
        os.close(descriptor)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OutputError(
                f"another elastic run is writing output {output}", "wait for it to finish, or choose another --output"
            ) from None
        raise output_error(folder, error) from error
    return descriptor


# flock errors of file systems that do not support locks at all
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}
