"""``elastic push``: verify an artifact folder, then publish it to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from elastic_cli.cli.options import Json, Quiet, Verbose
from elastic_cli.cli.output import configure_logging, emit, format_bytes

Folder = Annotated[
    Path,
    typer.Argument(
        metavar="DIR",
        help="Artifact folder written by elastic slice (one budget) or elastic quantize.",
        show_default=False,
    ),
]
RepoId = Annotated[
    str, typer.Argument(metavar="REPO_ID", help="Target repo on the hub: namespace/name.", show_default=False)
]
Branch = Annotated[
    Optional[str],
    typer.Option(
        "--revision",
        help="Branch to commit to, created if missing (default: the repo's default branch).",
        show_default=False,
    ),
]
Private = Annotated[
    bool, typer.Option("--private", help="Create the repo as private. An existing repo keeps its visibility.")
]
CommitMessage = Annotated[
    Optional[str],
    typer.Option(
        "--commit-message",
        help="Commit message (default: the artifact's kind, budget, format and elastic version).",
        show_default=False,
    ),
]
PushDryRun = Annotated[
    bool, typer.Option("--dry-run", help="Verify and list what would be uploaded, without contacting the hub.")
]


def push(
    folder: Folder,
    repo_id: RepoId,
    revision: Branch = None,
    private: Private = False,
    commit_message: CommitMessage = None,
    dry_run: PushDryRun = False,
    json: Json = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Verify an artifact folder and upload it to a Hugging Face repo in one commit.

    An artifact that fails verification is not uploaded. The token comes from HF_TOKEN or `hf auth login`.

    Examples:

        elastic push ./nano-12b my-org/Nemotron-Elastic-12B --dry-run

        elastic push ./elastic-nvfp4 my-org/Nemotron-Elastic-NVFP4 --private --revision v1
    """
    configure_logging(verbose, quiet, keep_global=True)
    from elastic_cli.publish import PublishResult, plan_publish, publish  # imports torch, through verify

    plan = plan_publish(folder, repo_id, revision, private, commit_message)
    result = PublishResult(plan, dry_run=True, commit_url=None) if dry_run else publish(plan)
    emit(result.to_json(), json, _render)


def _render(console: Console, data: dict[str, Any]) -> None:
    branch = f"branch {data['revision']}" if data["revision"] else "the default branch"
    verb = "Would upload" if data["dry_run"] else "Uploaded"
    total = f"{format_bytes(data['bytes'])} ({data['bytes']:,} bytes)"
    console.print(
        f"{verb} {len(data['files'])} file(s), {total}, to {data['repo_id']} ({branch}):", highlight=False, markup=False
    )
    width = max(len(format_bytes(entry["size"])) for entry in data["files"])
    for entry in data["files"]:
        console.print(
            f"  {entry['sha256']}  {format_bytes(entry['size']):>{width}}  {entry['name']}",
            highlight=False,
            markup=False,
        )
    console.print(f"commit message: {data['commit_message']}", highlight=False, markup=False)
    if data["commit_url"]:
        console.print(f"commit: {data['commit_url']}", highlight=False, markup=False)
