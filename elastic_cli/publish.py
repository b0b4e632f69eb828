"""Publish a verified artifact folder to the Hugging Face Hub.

:func:`plan_publish` checks the target repo id, runs :func:`elastic_cli.verify.verify_artifact`
on the folder and lists the files its manifest records. It never contacts the hub, so a dry run
is that plan alone. :func:`publish` creates the repo (and the branch) when missing and uploads
exactly the listed files in one commit with ``HfApi.upload_folder``. The token comes from
huggingface_hub's usual sources: ``HF_TOKEN`` or the login stored by ``hf auth login``.

Hub failures (no token, rejected token, missing repo, network, offline mode) are raised as
:class:`PublishError` with a hint, so the command line prints them as one ``Error:`` line.
"""

from __future__ import annotations

import glob
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic_cli.checkpoint.manifest import MANIFEST_FILE, file_digest
from elastic_cli.checkpoint.reader import read_json
from elastic_cli.errors import CheckpointError, ElasticError, UsageError
from elastic_cli.verify import verify_artifact

log = logging.getLogger(__name__)

# An unsound artifact is rejected with this many of its problems in the one-line error.
PROBLEMS_IN_ERROR = 3
DEFAULT_BRANCH = "main"
LOGIN_HINT = "log in with `hf auth login`, or set HF_TOKEN to a token with write access"


class PublishError(ElasticError):
    """A hub operation of ``elastic push`` that failed: authentication, a missing repo, the network."""


class UnsoundArtifactError(CheckpointError):
    """An artifact folder that failed verification and so must not be published."""


@dataclass(frozen=True)
class PublishFile:
    """One file to upload, as the artifact's manifest records it (sizes in bytes)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PublishPlan:
    """The files ``elastic push`` uploads, with the target repo, branch and commit message.

    Attributes:
        folder: The verified artifact folder.
        repo_id: The target repo, ``namespace/name``.
        revision: The target branch, or ``None`` for the repo's default branch.
        private: Create the repo as private when it does not exist yet.
        commit_message: The commit message of the upload.
        files: Every file of the artifact, the manifest included, sorted by name.
    """

    folder: Path
    repo_id: str
    revision: str | None
    private: bool
    commit_message: str
    files: tuple[PublishFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)


@dataclass(frozen=True)
class PublishResult:
    """A planned or finished upload. ``commit_url`` is ``None`` for a dry run."""

    plan: PublishPlan
    dry_run: bool
    commit_url: str | None

    def to_json(self) -> dict[str, Any]:
        """Return the result as a JSON-able document with a fixed set of keys."""
        return {
            "repo_id": self.plan.repo_id,
            "revision": self.plan.revision,
            "dry_run": self.dry_run,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.plan.files],
            "bytes": self.plan.total_bytes,
            "commit_message": self.plan.commit_message,
            "commit_url": self.commit_url,
        }


def check_repo_id(repo_id: str) -> None:
    """Reject a repo id that the hub would reject, before anything is verified or uploaded.

    The namespace is required, so that the target is known without asking the hub who the
    token belongs to.

    Raises:
        UsageError: If ``repo_id`` is not ``namespace/name`` with valid characters.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = (
        "pass namespace/name, such as my-org/Nemotron-Elastic-12B: letters, digits, '-', '_' and '.', no '--' or '..'"
    )
    if repo_id.count("/") != 1:
        raise UsageError(f"repo id {repo_id!r} is invalid: it must have the form namespace/name", hint)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"repo id {repo_id!r} is invalid for the Hugging Face Hub", hint) from error


def plan_publish(
    folder: Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> PublishPlan:
    """Verify an artifact folder and list the files publishing it uploads, without contacting the hub.

    Args:
        folder: A folder written by ``elastic slice`` (one budget) or ``elastic quantize``.
        repo_id: The target repo, ``namespace/name``.
        revision: The target branch; ``None`` for the repo's default branch.
        private: Create the repo as private when it does not exist yet.
        commit_message: The commit message; ``None`` builds one from the manifest.

    Returns:
        The plan: every file the manifest lists, plus the manifest itself.

    Raises:
        UsageError: If ``repo_id`` or ``revision`` is invalid, or ``folder`` is not an artifact folder.
        UnsoundArtifactError: If verification found a problem; the message names the first ones.
    """
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise UsageError("--revision is empty", "pass a branch name, or drop --revision for the default branch")
    folder = Path(folder)

    report = verify_artifact(folder)
    if not report.ok:
        first_problems = "; ".join(report.problems[:PROBLEMS_IN_ERROR])
        more = len(report.problems) - PROBLEMS_IN_ERROR
        count = len(report.problems)
        raise UnsoundArtifactError(
            f"{folder} failed verification with {count} problem(s), so it is not published: {first_problems}"
            + (f"; and {more} more" if more > 0 else ""),
            f"run `elastic verify {folder}` for the full report, then rebuild the artifact",
        )

    # verify_artifact has checked every listed file's size and sha256 and that no file is unlisted.
    manifest = read_json(folder / MANIFEST_FILE, MANIFEST_FILE)
    files = [PublishFile(name, entry["size"], entry["sha256"]) for name, entry in manifest["files"].items()]
    manifest_sha256, manifest_size = file_digest(folder / MANIFEST_FILE)
    files.append(PublishFile(MANIFEST_FILE, manifest_size, manifest_sha256))
    return PublishPlan(
        folder=folder,
        repo_id=repo_id,
        revision=revision,
        private=private,
        commit_message=commit_message or default_commit_message(manifest),
        files=tuple(sorted(files, key=lambda file: file.name)),
    )


def default_commit_message(manifest: dict[str, Any]) -> str:
    """Describe an artifact in one line from its manifest: kind, budget, format, parent, elastic version."""
    tool = manifest.get("tool") if isinstance(manifest.get("tool"), dict) else {}
    parent = manifest.get("parent") if isinstance(manifest.get("parent"), dict) else {}
    version = tool.get("version", "unknown")
    parent_name = parent.get("name") or "an unnamed parent"
    fmt = manifest.get("format") or "unknown format"
    if manifest.get("kind") == "slice":
        return f"Upload budget {manifest.get('budget')} ({fmt}) sliced from {parent_name} with elastic {version}"
    if manifest.get("kind") == "quantize":
        return f"Upload {fmt} quantization of {parent_name} made with elastic {version}"
    return f"Upload {manifest.get('kind')} artifact of {parent_name} made with elastic {version}"


def publish(plan: PublishPlan) -> PublishResult:
    """Create the repo (and branch) if missing and upload the planned files in one commit.

    Files that the target revision already has and the artifact lacks are left in place.

    Returns:
        The result, with the URL of the new commit.

    Raises:
        PublishError: If the hub rejects a request or cannot be reached.
    """
    from huggingface_hub import HfApi

    started = time.monotonic()
    try:
        commit = _upload(HfApi(), plan)
    except ElasticError:
        raise
    except Exception as error:
        translated = _translate(error, plan)
        if translated is None:
            raise
        raise translated from error
    commit_url = getattr(commit, "commit_url", None)
    log.info("published %s in %.1f s: %s", plan.repo_id, time.monotonic() - started, commit_url)
    return PublishResult(plan, dry_run=False, commit_url=commit_url)


def _upload(api: Any, plan: PublishPlan) -> Any:
    """Run the hub calls of :func:`publish` and return upload_folder's ``CommitInfo``."""
    log.info("creating %s on the hub unless it exists", plan.repo_id)
    api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
    if plan.revision is not None and plan.revision != DEFAULT_BRANCH:
        api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
    log.info("uploading %d file(s), %d bytes, from %s", len(plan.files), plan.total_bytes, plan.folder)
    # Exact names, so that a file written into the folder after verification is not uploaded.
    return api.upload_folder(
        folder_path=plan.folder,
        repo_id=plan.repo_id,
        revision=plan.revision,
        commit_message=plan.commit_message,
        allow_patterns=[glob.escape(file.name) for file in plan.files],
    )


def _translate(error: Exception, plan: PublishPlan) -> PublishError | None:
    """Return the :class:`PublishError` for a huggingface_hub exception, or ``None`` to re-raise it."""
    from huggingface_hub import errors as hub

    repo = plan.repo_id
    target = f"{repo}@{plan.revision}" if plan.revision else repo
    if isinstance(error, hub.OfflineModeIsEnabled):
        return PublishError(
            "HF_HUB_OFFLINE=1 is set, so elastic push cannot contact the hub", "unset HF_HUB_OFFLINE, or pass --dry-run"
        )
    if isinstance(error, hub.LocalTokenNotFoundError):
        return PublishError(f"no Hugging Face token found to push {repo}", LOGIN_HINT)
    if isinstance(error, hub.RevisionNotFoundError):
        return PublishError(f"branch {plan.revision!r} not found in {repo}", "check --revision")
    if isinstance(error, hub.RepositoryNotFoundError):
        return PublishError(f"repo {repo} not found, or the token cannot access it", LOGIN_HINT)
    if isinstance(error, hub.HFValidationError):
        return PublishError(
            f"huggingface_hub rejected the request for {target}: {error}", "check the repo id and --revision"
        )
    if isinstance(error, hub.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return PublishError(f"the hub rejected the token (HTTP 401) while pushing {target}", LOGIN_HINT)
        if status == 403:
            return PublishError(
                f"the token may not write to {repo} (HTTP 403)",
                f"use a token with write access to {repo.split('/')[0]}",
            )
        detail = getattr(error, "server_message", None) or str(error).strip().splitlines()[0]
        code = f" (HTTP {status})" if status is not None else ""
        return PublishError(
            f"the hub rejected the push to {target}{code}: {detail}", "check the repo id and --revision, then retry"
        )
    if isinstance(error, (hub.HTTPError, OSError)):
        # Connection failures: huggingface_hub.errors.HTTPError is the base of httpx's transport
        # errors in current releases, and requests' ConnectionError (an OSError) in 0.x releases.
        return PublishError(
            f"cannot reach the Hugging Face Hub to push {target}: {error}",
            "check the network and HF_ENDPOINT, then retry",
        )
    return None
