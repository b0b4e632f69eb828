"""Resolve a checkpoint argument: a local folder or a Hugging Face repo id.

A repo id (``org/name``, optional ``--revision``) is resolved through huggingface_hub's
``snapshot_download`` with only the files elastic uses, so the offline cache is honoured
(``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE``) and nothing else is fetched.

huggingface_hub stores a repo in its cache as ``models--org--name/``: file contents in
``blobs/``, and each commit in ``snapshots/<commit>/`` as relative links into ``blobs/``. A
checkpoint file must resolve inside its trust root, which for such a snapshot is the repo
folder and for any other local folder is the folder itself.
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
_MODEL_REPO_PREFIX = "models--"
_PATH_STARTS = ("./", "../", "/", "~")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Location on disk and origin of a resolved checkpoint.

    Attributes:
        path: The folder holding ``config.json`` and the shards.
        trust_root: The folder every file must resolve inside.
        name: The repo id (also for a local hub cache snapshot), or the local folder's name
            (never an absolute path, so outputs that record it stay the same wherever the
            input lies).
        revision: The commit hash for hub checkpoints and local hub cache snapshots, ``None``
            for other local folders.
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
        CheckpointError: If the folder does not exist and ``spec`` is a path or not a valid repo
            id, or the repo cannot be resolved (offline and not cached, unknown repo or revision).
    """
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{spec} is a file, not a checkpoint folder", "pass the folder that contains config.json")
        if revision is not None:
            raise UsageError(f"--revision {revision} applies to hub repo ids, not to the local folder {spec}", "drop --revision")
        return _resolve_local(local)

    if _names_local_path(spec):
        raise CheckpointError(f"checkpoint folder {spec!r} does not exist", _missing_folder_hint(spec, local))
    if not _REPO_ID.match(spec) or ".." in spec:
        raise CheckpointError(
            f"{spec!r} is neither an existing folder nor a Hugging Face repo id",
            "pass a checkpoint folder or an id like org/name",
        )
    return _resolve_repo(spec, revision)


def _resolve_local(folder: Path) -> ResolvedCheckpoint:
    """Resolve an existing local folder, trusting its hub cache repo folder if it is a snapshot.

    A snapshot folder is named after its repo id and commit, as ``_resolve_repo`` names it, so
    both ways of passing the same snapshot write the same outputs.
    """
    real = folder.resolve()
    repo = real.parent.parent
    in_snapshots = real.parent.name == "snapshots" and repo.name.startswith(_MODEL_REPO_PREFIX)
    if not (in_snapshots and (repo / "blobs").is_dir()):
        return ResolvedCheckpoint(path=folder, trust_root=real, name=real.name, revision=None)

    # huggingface_hub (2.4, repo_folder_name) joins "models" and the parts of the repo id with
    # "--", and validate_repo_id rejects "--" inside an id, so this reverses it exactly.
    repo_id = repo.name.removeprefix(_MODEL_REPO_PREFIX).replace("--", "/")
    return ResolvedCheckpoint(path=folder, trust_root=repo, name=repo_id, revision=real.name)


def _names_local_path(spec: str) -> bool:
    """Tell whether a missing ``spec`` is a local path rather than a repo id.

    It is one when it starts like a path (``./``, ``../``, ``/``, ``~``), has more than one
    slash, or has one slash after the name of a local folder (``ckpts/typo`` with ``ckpts/``
    present, which is also a valid repo id).
    """
    if spec.startswith(_PATH_STARTS) or spec.count("/") > 1:
        return True
    first, slash, _ = spec.partition("/")
    return bool(slash) and Path(first).is_dir()


def _missing_folder_hint(spec: str, path: Path) -> str:
    """Name the deepest folder of ``path`` that exists, so the typo is easy to find."""
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing in (Path("."), Path(existing.anchor)):
        return "check the path"

    hint = f"{existing} exists but contains no {path.relative_to(existing)}, so check the path"
    if _REPO_ID.match(spec):
        hint += f". To use the Hugging Face repo {spec}, run elastic from a folder without a {existing} subfolder"
    return hint


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
