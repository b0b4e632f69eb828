"""Resolve a checkpoint argument: a local folder or a Hugging Face repo id.

A repo id (``org/name``, optional ``--revision``) is resolved through huggingface_hub's
``snapshot_download`` with only the files elastic uses, so the offline cache is honoured
(``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE``) and nothing else is fetched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from elastic_cli.errors import CheckpointError, UsageError

# Weights, configs, tokenizer and chat-template files, remote code, docs; never .bin/.pt/.gguf.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.py",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.md",
    "*.tiktoken",
    "LICENSE*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Location on disk and origin of a resolved checkpoint.

    Attributes:
        path: The folder holding ``config.json`` and the shards.
        trust_root: The folder every file must resolve inside.
        name: The repo id, or the local folder's name (never an absolute path, so outputs
            that record it stay the same wherever the input lies).
        revision: The commit hash for hub checkpoints, ``None`` for local folders.
    """

    path: Path
    trust_root: Path
    name: str
    revision: str | None


def resolve_checkpoint(spec: str, revision: str | None = None) -> ResolvedCheckpoint:
    """Resolve a local folder or a Hugging Face repo id to a folder on disk.

    Args:
        spec: A folder path, or ``org/name``.
        revision: Branch, tag or commit of a hub repo; rejected for local folders.

    Raises:
        CheckpointError: If the folder does not exist and ``spec`` is not a valid repo id, or
            the repo cannot be resolved (offline and not cached, unknown repo or revision).
    """
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{spec} is a file, not a checkpoint folder", "pass the folder that contains config.json")
        if revision is not None:
            raise UsageError(f"--revision {revision} applies to hub repo ids, not to the local folder {spec}", "drop --revision")
        return ResolvedCheckpoint(path=local, trust_root=local.resolve(), name=local.resolve().name, revision=None)

    if not _REPO_ID.match(spec) or ".." in spec:
        raise CheckpointError(
            f"{spec!r} is neither an existing folder nor a Hugging Face repo id",
            "pass a checkpoint folder or an id like org/name",
        )
    return _resolve_repo(spec, revision)


def _resolve_repo(repo_id: str, revision: str | None) -> ResolvedCheckpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except RevisionNotFoundError as error:
        raise CheckpointError(f"revision {revision!r} not found in {repo_id}", "check --revision") from error
    except GatedRepoError as error:
        raise CheckpointError(f"{repo_id} is gated", "accept its terms on the hub and log in with `hf auth login`") from error
    except RepositoryNotFoundError as error:
        raise CheckpointError(f"repo {repo_id} not found on the hub", "check the id, or log in for a private repo") from error
    except LocalEntryNotFoundError as error:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached",
            "connect to the network, unset HF_HUB_OFFLINE, or download the repo first",
        ) from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"resolving {repo_id} failed: {error}", "check the repo id and the network") from error

    # Snapshot files are links into the cache's blobs/ folder: the repo folder is the trust root.
    repo_root = folder.resolve().parent.parent
    return ResolvedCheckpoint(path=folder, trust_root=repo_root, name=repo_id, revision=folder.name)
