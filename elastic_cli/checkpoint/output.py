"""Output destinations and sidecar files.

Outputs are written into a hidden folder beside the destination and renamed into place in one
step once complete (see ``elastic_cli.checkpoint.resume``), so a destination either contains a
finished artifact or does not exist. This module checks destinations, replaces them, and copies
sidecar files.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from elastic_cli.checkpoint.writer import output_error
from elastic_cli.errors import OutputError, UsageError

log = logging.getLogger(__name__)


# Files that slicing regenerates or that belong to the parent only.
REGENERATED = {"config.json", "model.safetensors.index.json", "README.md", "elastic_config.json", "elastic-manifest.json"}


def check_inputs_kept(output: Path, inputs: tuple[Path, ...]) -> None:
    """Raise :class:`UsageError` when replacing ``output`` would delete one of ``inputs``."""
    target = output.resolve()
    for source in inputs:
        source = source.resolve()
        if source == target or target in source.parents:
            raise UsageError(
                f"--output {output} would replace the input {source}",
                "choose an output folder that neither is nor contains the input",
            )


def check_destination(output: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Fail early when the destination exists (without ``overwrite``) or cannot be created.

    Raises:
        UsageError: If the destination is one of ``inputs`` or a folder that contains one,
            which replacing it would delete.
        OutputError: If the destination exists without ``overwrite``, is a file, or cannot
            be created or written.
    """
    check_inputs_kept(output, inputs)
    working = Path.cwd().resolve()
    target = output.resolve()
    if target == working or target in working.parents:
        raise UsageError(
            f"--output {output} is the current folder or contains it",
            "choose a new folder, such as --output ./child",
        )
    try:
        exists = output.exists()
    except OSError as error:  # such as a name longer than the file system allows
        raise OutputError(f"cannot use output {output}: {error.strerror or error}", "choose another --output") from error
    if exists and not output.is_dir():
        raise OutputError(f"output {output} exists and is not a folder", "choose another --output")
    if exists and not overwrite:
        raise OutputError(f"output {output} already exists", "pass --overwrite to replace it, or choose another --output")
    parent = output.parent
    blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"cannot create output {output}: {blocker} is a file, not a folder", "choose another --output")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the folder for output {output}: {error.strerror or error}", "choose a writable --output folder"
        ) from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {output}: {parent} is not writable", "choose a writable --output folder")


# Hidden names beside the output keep at most this much of its name, so that they stay within
# the 255-byte limit of common file systems whatever the output's name.
_HIDDEN_NAME_CHARS = 160


def hidden_name(output: Path, suffix: str) -> str:
    """Return the name of a hidden file or folder beside ``output``: ``.NAME`` and ``suffix``."""
    return f".{output.name[:_HIDDEN_NAME_CHARS]}{suffix}"


def replace_destination(temp: Path, output: Path, overwrite: bool) -> None:
    _fsync_dir(temp)
    if output.exists():
        if not overwrite:
            raise OutputError(f"output {output} appeared while writing", "pass --overwrite or choose another --output")
        trash = output.parent / hidden_name(output, f".old-{secrets.token_hex(4)}")
        try:
            os.rename(output, trash)
        except OSError as error:
            raise output_error(output, error) from error
        try:
            os.rename(temp, output)
        except OSError as error:
            os.rename(trash, output)  # put the old output back
            raise output_error(output, error) from error
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.rename(temp, output)
        except OSError as error:
            raise output_error(output, error) from error
    _fsync_dir(output.parent)


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def list_sidecars(root: Path, trust_root: Path, skip: set[str]) -> list[Path]:
    """List the files to carry over from a checkpoint folder: tokenizer files, chat template,
    generation config, remote code and licences; everything at the top level except weights,
    files in ``skip`` and hidden files.

    Raises:
        OutputError: If a sidecar is a link that resolves outside ``trust_root``.
    """
    files = []
    for path in sorted(root.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.name in skip or path.suffix == ".safetensors":
            continue
        if path.is_dir():
            log.debug("not carrying over folder %s", path.name)
            continue
        resolved = path.resolve()
        try:
            resolved.relative_to(trust_root)
        except ValueError:
            raise OutputError(
                f"sidecar {path.name} resolves to {resolved}, outside the checkpoint folder",
                "replace the link with the file itself",
            ) from None
        files.append(path)
    return files


def copy_sidecars(files: list[Path], folder: Path) -> list[str]:
    """Copy sidecar files byte for byte into ``folder``; return their names."""
    names = []
    for path in files:
        target = folder / path.name
        try:
            shutil.copyfile(path, target)
        except OSError as error:
            raise output_error(target, error) from error
        names.append(path.name)
    return names
