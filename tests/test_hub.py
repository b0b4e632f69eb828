"""Hugging Face repo ids resolved from a local cache only, with ``HF_HUB_OFFLINE=1``.

The cache is laid out by hand as huggingface_hub writes it. ``models--org--name/blobs/``
contains the file contents, ``snapshots/<commit>/`` contains relative links into ``blobs/``, and
``refs/main`` contains the commit id. Nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from tests.conftest import CliResult

REPO_ID = "org/name"
COMMIT = "3f2b4c6d8e0a1b2c3d4e5f60718293a4b5c6d7e8"


def build_hub_cache(cache: Path, checkpoint: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """Store ``checkpoint`` as the cached snapshot ``commit`` of ``repo_id`` and return the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / commit
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for source in sorted(checkpoint.iterdir()):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blobs / digest)
        (snapshot / source.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, elastic_checkpoint: Path) -> Path:
    """Return a Hugging Face cache folder containing the tiny checkpoint as ``org/name`` at ``COMMIT``."""
    cache = tmp_path / "hf-cache"
    build_hub_cache(cache, elastic_checkpoint)
    return cache


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> Path:
    """Point the in-process huggingface_hub at ``hub_cache`` in offline mode and return the cache folder.

    huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` into module constants at
    import, so the constants are patched as well as the environment.
    """
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def assert_succeeded(result: CliResult) -> None:
    assert result.exit_code == 0, f"exit code {result.exit_code}; stderr:\n{result.stderr}"
    assert "Error:" not in result.stderr, f"a successful run printed an error:\n{result.stderr}"


def assert_one_error(result: CliResult, *expected: str, exit_code: int = 1) -> str:
    """Check the exit code, one ``Error:`` line containing every ``expected`` text, no traceback."""
    assert result.exit_code == exit_code, (
        f"exit code {result.exit_code}, expected {exit_code}, stderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, f"traceback on stderr:\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, f"expected exactly one 'Error:' line on stderr, got {len(lines)}:\n{result.stderr}"
    for text in expected:
        assert text in lines[0], f"error line does not name {text!r}: {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The console entry in a subprocess, with the cache given only through the environment


def test_hub_inspect_json_reports_commit(run_cli, hub_cache):
    result = run_cli("inspect", REPO_ID, "--json", env={"HF_HUB_CACHE": str(hub_cache)})

    assert_succeeded(result)
    report = json.loads(result.stdout)
    assert report["checkpoint"]["name"] == REPO_ID
    assert report["checkpoint"]["revision"] == COMMIT
    assert [budget["name"] for budget in report["budgets"]] == ["large", "medium", "small"]


def test_hub_slice_model_card(run_cli, invoke_cli, hub_cache, elastic_checkpoint, tmp_path):
    output = tmp_path / "hub-out"

    result = run_cli("slice", REPO_ID, "--budget", "small", "--output", output, env={"HF_HUB_CACHE": str(hub_cache)})

    assert_succeeded(result)
    card = (output / "README.md").read_text()
    assert f"base_model: {REPO_ID}\n" in card, f"the model card front matter does not name {REPO_ID}:\n{card}"
    assert f"| parent | `{REPO_ID}` |" in card, f"the model card table does not name {REPO_ID}:\n{card}"
    assert f"| parent revision | `{COMMIT}` |" in card, f"the model card does not name commit {COMMIT}:\n{card}"

    # The same budget sliced from the local folder gives the same weights and config.
    local = tmp_path / "local-out"
    assert_succeeded(invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", local))
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        same = (output / name).read_bytes() == (local / name).read_bytes()
        assert same, f"{name} differs between the hub slice and the local slice"


# ---------------------------------------------------------------------------------------------
# In-process, with huggingface_hub patched to the hand-made cache


@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_hub_revision_resolves_to_commit(invoke_cli, offline_hub, revision):
    result = invoke_cli("inspect", REPO_ID, "--revision", revision, "--json")

    assert_succeeded(result)
    assert json.loads(result.stdout)["checkpoint"]["revision"] == COMMIT


def test_hub_repo_not_cached_offline(invoke_cli, offline_hub, tmp_path):
    output = tmp_path / "out"

    result = invoke_cli("slice", "org/absent", "--budget", "small", "--output", output)

    assert_one_error(result, "org/absent", "not in the local Hugging Face cache")
    assert result.stdout == "", f"an error printed to stdout: {result.stdout!r}"
    assert not output.exists(), "a failed resolution created the output folder"


def test_revision_on_local_folder_rejected(invoke_cli, elastic_checkpoint):
    result = invoke_cli("inspect", elastic_checkpoint, "--revision", "main")

    assert result.exit_code != 0, "--revision was accepted for a local folder"
    assert "Traceback" not in result.stderr, f"traceback on stderr:\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, f"expected exactly one 'Error:' line on stderr:\n{result.stderr}"
    assert "--revision" in lines[0], f"the error does not name --revision: {lines[0]}"


def test_revision_on_local_folder_is_usage_error(invoke_cli, elastic_checkpoint):
    result = invoke_cli("inspect", elastic_checkpoint, "--revision", "main")

    assert_one_error(result, "--revision", exit_code=2)


@pytest.mark.parametrize(
    "name",
    [
        "model-00001-of-00003.safetensors",
        "generation_config.json",
        "config.json",
        "model.safetensors.index.json",
        "elastic_config.json",
    ],
)
def test_hub_link_outside_cache_rejected(invoke_cli, offline_hub, tmp_path, name):
    snapshot = offline_hub / "models--org--name" / "snapshots" / COMMIT
    assert (snapshot / name).is_symlink(), f"the cached snapshot has no link {name} to replace"
    outside = tmp_path / "outside" / name
    outside.parent.mkdir()
    shutil.copyfile(snapshot / name, outside)  # same bytes, so only the link's target is wrong
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(outside)
    output = tmp_path / "out"

    result = invoke_cli("slice", REPO_ID, "--budget", "small", "--output", output)

    assert_one_error(result, name, "outside")
    assert not output.exists(), "a rejected checkpoint produced an output folder"
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert leftovers == [], f"a rejected checkpoint left temporary folders {leftovers}"
