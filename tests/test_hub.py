"""The checkpoint argument: repo ids and cache snapshots resolved from a local cache only.

The cache is laid out by hand as huggingface_hub writes it. ``models--org--name/blobs/``
contains the file contents, ``snapshots/<commit>/`` contains relative links into ``blobs/``, and
``refs/main`` contains the commit id. Every test runs with ``HF_HUB_OFFLINE=1``, and the tests of
missing local paths also replace ``snapshot_download`` so that any attempt to resolve a repo fails.
Nothing here reaches the network. The last section tests the ``--max-shard-size`` parser.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest

from elastic_cli.cli.options import parse_size
from elastic_cli.errors import UsageError
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


# ---------------------------------------------------------------------------------------------
# A cache snapshot folder passed as a local path


def test_snapshot_path_slices_like_repo_id(invoke_cli, offline_hub, tmp_path):
    snapshot = offline_hub / "models--org--name" / "snapshots" / COMMIT
    from_path, from_repo = tmp_path / "from-path", tmp_path / "from-repo"

    assert_succeeded(invoke_cli("slice", snapshot, "--budget", "small", "--output", from_path))
    assert_succeeded(invoke_cli("slice", REPO_ID, "--budget", "small", "--output", from_repo))

    names = sorted(path.name for path in from_path.iterdir())
    assert names == sorted(path.name for path in from_repo.iterdir()), "the two slices hold different files"
    for name in names:
        same = (from_path / name).read_bytes() == (from_repo / name).read_bytes()
        assert same, f"{name} differs between the slice of the snapshot path and the slice of {REPO_ID}"


def test_snapshot_path_named_by_repo_and_commit(invoke_cli, hub_cache):
    snapshot = hub_cache / "models--org--name" / "snapshots" / COMMIT

    result = invoke_cli("inspect", snapshot, "--json")

    assert_succeeded(result)
    checkpoint = json.loads(result.stdout)["checkpoint"]
    assert checkpoint["name"] == REPO_ID, f"the snapshot is not named after its repo: {checkpoint['name']}"
    assert checkpoint["revision"] == COMMIT, f"the snapshot is not named after its commit: {checkpoint['revision']}"


def replace_link(snapshot: Path, name: str, target: Path) -> None:
    """Point the link ``snapshot/name`` at a copy of its file stored at ``target``."""
    assert (snapshot / name).is_symlink(), f"the snapshot has no link {name} to replace"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(snapshot / name, target)  # same bytes, so only the link's target is wrong
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(target)


@pytest.mark.parametrize("name", ["config.json", "model-00001-of-00003.safetensors", "generation_config.json"])
@pytest.mark.parametrize("place", ["outside the cache", "blobs of another repo", "cache root"])
def test_snapshot_path_link_outside_repo_rejected(invoke_cli, hub_cache, tmp_path, name, place):
    snapshot = hub_cache / "models--org--name" / "snapshots" / COMMIT
    target = {
        "outside the cache": tmp_path / "outside" / name,
        "blobs of another repo": hub_cache / "models--org--other" / "blobs" / name,
        "cache root": hub_cache / name,
    }[place]
    replace_link(snapshot, name, target)
    output = tmp_path / "out"

    result = invoke_cli("slice", snapshot, "--budget", "small", "--output", output)

    assert_one_error(result, name, "outside")
    assert not output.exists(), "a rejected checkpoint produced an output folder"


@pytest.mark.parametrize("layout", ["no blobs folder", "not a model repo folder", "not under snapshots"])
def test_snapshot_like_layout_not_trusted(invoke_cli, tmp_path, elastic_checkpoint, layout):
    # Each layout misses one mark of a hub cache snapshot, so the folder itself stays the trust
    # root and its links into the folder above are rejected.
    cache = tmp_path / "cache"
    snapshot = build_hub_cache(cache, elastic_checkpoint)
    repo = cache / "models--org--name"
    if layout == "no blobs folder":
        (repo / "blobs").rename(repo / "store")
        for link in snapshot.iterdir():
            digest = Path(os.readlink(link)).name
            link.unlink()
            link.symlink_to(Path("..", "..", "store", digest))
    elif layout == "not a model repo folder":
        snapshot = Path(shutil.move(repo, cache / "org--name")) / "snapshots" / COMMIT
    else:
        snapshot = Path(shutil.move(snapshot, repo / "commits" / COMMIT))
    output = tmp_path / "out"

    result = invoke_cli("slice", snapshot, "--budget", "small", "--output", output)

    assert_one_error(result, "outside the checkpoint folder")
    assert not output.exists(), "a rejected checkpoint produced an output folder"


# ---------------------------------------------------------------------------------------------
# A missing local path is reported as one, without trying the hub


@pytest.fixture
def repo_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace ``snapshot_download`` with a stub that records the repo id and raises as offline.

    elastic imports ``snapshot_download`` from the package when it resolves a repo, so the stub
    takes the place of every download.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    requested: list[str] = []

    def stub(repo_id: str, **kwargs: object) -> str:
        requested.append(repo_id)
        raise LocalEntryNotFoundError(f"{repo_id} is not cached (stub)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stub)
    return requested


def test_missing_path_under_local_folder(invoke_cli, repo_requests, tmp_path):
    (tmp_path / "t3").mkdir()

    result = invoke_cli("slice", "t3/typo", "--budget", "small", "--output", tmp_path / "out", cwd=tmp_path)

    assert_one_error(result, "checkpoint folder 't3/typo' does not exist")
    assert repo_requests == [], f"a missing local path was looked up on the hub as {repo_requests}"
    hints = [line for line in result.stderr.splitlines() if line.startswith("Hint:")]
    assert len(hints) == 1, f"expected one 'Hint:' line on stderr:\n{result.stderr}"
    assert "t3 exists but contains no typo" in hints[0], f"the hint does not name the existing folder: {hints[0]}"


@pytest.mark.parametrize("spec", ["./typo", "../no-such-folder", "a/b/c", "t3/typo/", "{tmp}/absent/parent"])
def test_missing_path_like_spec(invoke_cli, repo_requests, tmp_path, spec):
    spec = spec.format(tmp=tmp_path)
    (tmp_path / "t3").mkdir()

    result = invoke_cli("inspect", spec, cwd=tmp_path)

    assert_one_error(result, f"checkpoint folder {spec!r} does not exist")
    assert repo_requests == [], f"a missing local path was looked up on the hub as {repo_requests}"


def test_repo_id_without_local_folder_goes_to_hub(invoke_cli, repo_requests, tmp_path):
    # "t3" exists only inside "elsewhere", so from the working folder "t3/typo" is a repo id.
    (tmp_path / "elsewhere" / "t3").mkdir(parents=True)

    result = invoke_cli("inspect", "t3/typo", cwd=tmp_path)

    assert_one_error(result, "t3/typo", "not in the local Hugging Face cache")
    assert repo_requests == ["t3/typo"], f"the repo id was not resolved through the hub cache: {repo_requests}"


def test_repo_id_beside_same_named_file(invoke_cli, repo_requests, tmp_path):
    # A file (not a folder) named like the namespace does not make the argument a path.
    (tmp_path / "org").write_text("not a folder\n")

    result = invoke_cli("inspect", "org/name", cwd=tmp_path)

    assert_one_error(result, "org/name", "not in the local Hugging Face cache")
    assert repo_requests == ["org/name"], f"the repo id was not resolved through the hub cache: {repo_requests}"


# ---------------------------------------------------------------------------------------------
# --max-shard-size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", 7),
        ("3B", 3),
        ("500MB", 500 * 1000**2),
        ("5GB", 5 * 1000**3),
        ("2TB", 2 * 1000**4),
        ("1PB", 1000**5),
        ("1pb", 1000**5),
        (" 1 PB ", 1000**5),
        ("4KiB", 4 * 1024),
        ("2GiB", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("1PiB", 1024**5),
        ("2pib", 2 * 1024**5),
        ("1.5PiB", 1_688_849_860_263_936),
        ("0.001PB", 10**12),
        ("1.5B", 1),
    ],
)
def test_parse_size_units(text, expected):
    assert parse_size(text, "--max-shard-size") == expected, f"{text!r} parsed to the wrong byte count"


@pytest.mark.parametrize("text", ["", "PB", "1EB", "1EiB", "1PBB", "1 P B", "-1GB", "0", "0.5B", "1e3"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError) as raised:
        parse_size(text, "--max-shard-size")

    assert f"--max-shard-size {text!r}" in raised.value.message, f"the error does not name the value: {raised.value.message}"


def test_max_shard_size_petabytes_one_shard(invoke_cli, elastic_checkpoint, tmp_path):
    output = tmp_path / "out"

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--max-shard-size", "1PB", "--output", output)

    assert_succeeded(result)
    shards = sorted(path.name for path in output.glob("*.safetensors"))
    assert shards == ["model.safetensors"], f"a 1PB shard limit did not give one shard: {shards}"


@pytest.mark.parametrize(
    "command",
    [("slice", "--budget", "small", "--output", "out", "--dry-run"), ("quantize", "--format", "fp8", "--dry-run")],
)
def test_max_shard_size_invalid_in_dry_run(invoke_cli, elastic_checkpoint, command):
    name, *options = command

    result = invoke_cli(name, elastic_checkpoint, *options, "--max-shard-size", "1EB")

    assert_one_error(result, "--max-shard-size '1EB'", "not a size", exit_code=2)
