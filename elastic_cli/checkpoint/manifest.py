"""Artifact manifests: sha256 and size of every file, plus the provenance of the artifact.

``elastic-manifest.json`` lists every other file of an output folder with its sha256 and size,
the tool version, the parent's name and revision, the budget and format, and the resolved
options. It contains no timestamp and no absolute path, so the same inputs and options give the
same manifest bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from elastic_cli import __version__
from elastic_cli.checkpoint.writer import write_text

MANIFEST_FILE = "elastic-manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 * 1024 * 1024


def file_digest(path: Path) -> tuple[str, int]:
    """Return the sha256 (hex) and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_manifest(folder: Path, provenance: dict[str, Any], known: dict[str, tuple[str, int]] | None = None) -> dict[str, Any]:
    """Hash every file of ``folder`` and write the manifest; return its document.

    Args:
        folder: The artifact folder (complete except for the manifest).
        provenance: ``kind``, ``parent`` (name, revision), ``budget``, ``format``, ``options``.
        known: Digests already computed while writing (file name to ``(sha256, size)``).
    """
    files = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name == MANIFEST_FILE or path.name.startswith(".") or not path.is_file():
            continue  # hidden files are bookkeeping of an unfinished run (the resume journal)
        sha256, size = (known or {}).get(path.name) or file_digest(path)
        files[path.name] = {"sha256": sha256, "size": size}
    document = {
        "manifest_version": MANIFEST_VERSION,
        "tool": {"name": "elastic", "version": __version__},
        **provenance,
        "files": files,
    }
    write_text(folder / MANIFEST_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return document
