"""`elastic push` and the CI release example, with no network traffic.

Every test that reaches the upload path replaces ``huggingface_hub.HfApi`` with a fake that
records its calls, or runs the real client with ``HF_HUB_OFFLINE=1`` and an endpoint on the
loopback interface, so nothing leaves the machine. Hub failures are real huggingface_hub
exceptions, built by ``hf_raise_for_status`` from local responses that were never sent.

The last test runs ``examples/ci/release.sh`` end to end (slice, quantize with tiny
calibration, slice the quantized parent, verify, push --dry-run) on a small elastic checkpoint
with a tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import huggingface_hub.constants
import pytest

from elastic_cli import __version__
from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.manifest import MANIFEST_FILE, file_digest
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.quantize import export
from elastic_cli.quantize.calib_data import load_texts
from elastic_cli.quantize.pipeline import QuantizeOptions, QuantizerState, plan_for, quantize_checkpoint
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint
from elastic_cli.verify import verify_artifact
from tests.conftest import REPO_ROOT, CliResult

sys.path.insert(0, str(REPO_ROOT / "examples"))
from example_tokenizer import train_tokenizer  # noqa: E402

REPO_ID = "my-org/Nemotron-Elastic-small"
COMMIT_URL = "https://huggingface.co/my-org/Nemotron-Elastic-small/commit/0123456789abcdef"
# A port on the loopback interface that nothing listens on: a request that escapes the fakes fails locally.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"
PUSH_KEYS = {"repo_id", "revision", "dry_run", "files", "bytes", "commit_url"}
RELEASE_SCRIPT = REPO_ROOT / "examples" / "ci" / "release.sh"


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


class FakeCommitInfo:
    commit_url = COMMIT_URL


class FakeHfApi:
    """Stand-in for ``huggingface_hub.HfApi`` that records calls and raises ``errors[method]`` if set."""

    calls: ClassVar[list[tuple[str, tuple[Any, ...], dict[str, Any]]]] = []
    errors: ClassVar[dict[str, Exception]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _record(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        FakeHfApi.calls.append((method, args, kwargs))
        if method in FakeHfApi.errors:
            raise FakeHfApi.errors[method]

    def create_repo(self, *args: Any, **kwargs: Any) -> str:
        self._record("create_repo", args, kwargs)
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def create_branch(self, *args: Any, **kwargs: Any) -> None:
        self._record("create_branch", args, kwargs)

    def upload_folder(self, *args: Any, **kwargs: Any) -> FakeCommitInfo:
        self._record("upload_folder", args, kwargs)
        return FakeCommitInfo()


class ForbiddenHfApi:
    """Stand-in for ``huggingface_hub.HfApi`` that fails the test when anything creates a client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dry run or a rejected push created a huggingface_hub.HfApi client")


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    """Replace ``huggingface_hub.HfApi`` with :class:`FakeHfApi` and return the class, its log cleared."""
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "errors", {})
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything creates a ``huggingface_hub.HfApi`` client."""
    monkeypatch.setattr(huggingface_hub, "HfApi", ForbiddenHfApi)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep huggingface_hub offline, pointed at an unreachable endpoint and away from the user's token."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_ENDPOINT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE_ENDPOINT)


def given_state(source, options: QuantizeOptions) -> QuantizerState:
    """Return activation amax values per quantized module, as calibration would store them."""
    plan = plan_for(source, options)
    state = QuantizerState(calibration={"samples": 0, "tokens": 0, "budgets": []})
    for index, decision in enumerate(plan.decisions):
        if decision.format:
            state.modules[decision.module] = export.ModuleScales(decision.format, 0.0, 1.0 + index / 5)
    return state


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, elastic_checkpoint: Path) -> dict[str, Path]:
    """Slice budget 'small' of the tiny checkpoint (three shards) and quantize the parent to FP8."""
    root = tmp_path_factory.mktemp("publish")
    source = open_source(str(elastic_checkpoint))
    try:
        slice_checkpoint(source, plan_budgets(source, ["small"]), root / "small", nested=False, max_shard_bytes=250_000)
    finally:
        source.close()

    options = QuantizeOptions(format="fp8")
    source = open_source(str(elastic_checkpoint), require_budgets=False)
    try:
        quantize_checkpoint(source, options, root / "fp8", state=given_state(source, options))
    finally:
        source.close()
    return {"slice": root / "small", "quantize": root / "fp8"}


def manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Return every file of an artifact with its recorded size and sha256, the manifest included."""
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    sha256, size = file_digest(folder / MANIFEST_FILE)
    return {**files, MANIFEST_FILE: {"sha256": sha256, "size": size}}


def error_line(result: CliResult, exit_code: int) -> str:
    """Check the exit code, one ``Error:`` and one ``Hint:`` line and no traceback; return the ``Error:`` line."""
    assert result.exit_code == exit_code, (
        f"exit code {result.exit_code}, expected {exit_code}; stderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, f"traceback on stderr:\n{result.stderr}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"expected one 'Error:' line, got {len(errors)}:\n{result.stderr}"
    assert any(line.startswith("Hint:") for line in result.stderr.splitlines()), f"no 'Hint:' line:\n{result.stderr}"
    assert result.stdout == "", f"a failed push printed to stdout: {result.stdout!r}"
    return errors[0]


def hub_error(status: int, url: str, headers: dict[str, str] | None = None) -> Exception:
    """Return the exception huggingface_hub raises for a response to a request that is never sent."""
    from huggingface_hub.utils import hf_raise_for_status

    httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub builds its HTTP errors from httpx2 responses")
    response = httpx2.Response(
        status, request=httpx2.Request("POST", url), headers=headers or {}, json={"error": "refused"}
    )
    try:
        hf_raise_for_status(response)
    except Exception as error:  # noqa: BLE001 - the exception is the value under test
        return error
    raise AssertionError(f"hf_raise_for_status raised nothing for HTTP {status}")


def connection_error() -> Exception:
    """Return the exception huggingface_hub's HTTP client raises when the connection is refused."""
    httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub's HTTP client is httpx2")
    return httpx2.ConnectError("[Errno 111] Connection refused")


# ---------------------------------------------------------------------------------------------
# Dry run and verification


@pytest.mark.parametrize("kind", ["slice", "quantize"])
def test_push_dry_run_lists_manifest_files(artifacts, invoke_cli, no_hub, kind):
    folder = artifacts[kind]
    result = invoke_cli("push", folder, REPO_ID, "--dry-run", "--json")

    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert PUSH_KEYS <= set(document), f"missing keys: {PUSH_KEYS - set(document)}"
    assert document["repo_id"] == REPO_ID
    assert document["revision"] is None
    assert document["dry_run"] is True
    assert document["commit_url"] is None
    expected = manifest_files(folder)
    listed = {entry["name"]: {"sha256": entry["sha256"], "size": entry["size"]} for entry in document["files"]}
    assert listed == expected, "the dry run does not list exactly the manifest's files with their sizes and sha256"
    assert [entry["name"] for entry in document["files"]] == sorted(expected), "files are not sorted by name"
    assert document["bytes"] == sum(entry["size"] for entry in expected.values())
    assert sorted(path.name for path in folder.iterdir()) == sorted(expected), (
        "the folder holds files the plan leaves out"
    )


def test_push_dry_run_human_output(artifacts, invoke_cli, no_hub):
    folder = artifacts["slice"]
    result = invoke_cli("push", folder, REPO_ID, "--dry-run", "--revision", "v1")

    assert result.exit_code == 0, result.stderr
    files = manifest_files(folder)
    assert f"Would upload {len(files)} file(s)" in result.stdout
    assert f"to {REPO_ID} (branch v1)" in result.stdout
    for name, entry in files.items():
        assert any(name in line and entry["sha256"] in line for line in result.stdout.splitlines()), (
            f"{name} is not listed"
        )
    assert f"commit message: Upload budget small (bf16) sliced from parent with elastic {__version__}" in result.stdout


def test_push_rejects_damaged_artifact(artifacts, invoke_cli, fake_hub, tmp_path):
    folder = Path(shutil.copytree(artifacts["slice"], tmp_path / "small"))
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))

    for extra in ([], ["--dry-run"]):
        line = error_line(invoke_cli("push", folder, REPO_ID, *extra), exit_code=1)
        assert "failed verification" in line
        assert f"manifest: {shard.name} has sha256" in line, f"the error does not name the damaged shard: {line}"
    assert fake_hub.calls == [], "a damaged artifact reached the hub client"


def test_push_rejects_unlisted_file(artifacts, invoke_cli, fake_hub, tmp_path):
    folder = Path(shutil.copytree(artifacts["slice"], tmp_path / "small"))
    (folder / "notes.txt").write_text("not part of the artifact\n")

    line = error_line(invoke_cli("push", folder, REPO_ID), exit_code=1)
    assert "notes.txt is not listed" in line
    assert fake_hub.calls == []


@pytest.mark.parametrize(
    "repo_id",
    [
        "Nemotron-Elastic-small",
        "my-org/team/model",
        "my-org/bad--name",
        "my-org/.hidden",
        "my-org/name.git",
        "my org/name",
    ],
)
def test_push_invalid_repo_id_is_usage_error(artifacts, invoke_cli, fake_hub, repo_id):
    line = error_line(invoke_cli("push", artifacts["slice"], repo_id, "--dry-run"), exit_code=2)

    assert repr(repo_id) in line, f"the error does not name the repo id: {line}"
    assert fake_hub.calls == []


def test_push_not_an_artifact_folder(invoke_cli, fake_hub, tmp_path):
    (tmp_path / "empty").mkdir()

    line = error_line(invoke_cli("push", tmp_path / "empty", REPO_ID), exit_code=2)
    assert "is not an artifact folder" in line
    assert fake_hub.calls == []


# ---------------------------------------------------------------------------------------------
# Upload through a fake client


def test_push_uploads_through_hfapi(artifacts, invoke_cli, fake_hub):
    folder = artifacts["slice"]
    result = invoke_cli(
        "push", folder, REPO_ID, "--revision", "v1", "--private", "--commit-message", "Release v1", "--json"
    )

    assert result.exit_code == 0, result.stderr
    names = sorted(manifest_files(folder))
    assert [call[0] for call in fake_hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub.calls[0][1:] == ((REPO_ID,), {"private": True, "exist_ok": True})
    assert fake_hub.calls[1][1:] == ((REPO_ID,), {"branch": "v1", "exist_ok": True})
    upload = fake_hub.calls[2][2]
    assert fake_hub.calls[2][1] == ()
    assert Path(upload["folder_path"]) == folder
    assert upload["repo_id"] == REPO_ID
    assert upload["revision"] == "v1"
    assert upload["commit_message"] == "Release v1"
    assert sorted(upload["allow_patterns"]) == names, "the upload is not limited to the artifact's files"
    document = json.loads(result.stdout)
    assert document["dry_run"] is False
    assert document["commit_url"] == COMMIT_URL
    assert document["revision"] == "v1"
    assert sorted(entry["name"] for entry in document["files"]) == names


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("slice", f"Upload budget small (bf16) sliced from parent with elastic {__version__}"),
        ("quantize", f"Upload FP8 quantization of parent made with elastic {__version__}"),
    ],
)
def test_push_default_branch_and_message(artifacts, invoke_cli, fake_hub, kind, message):
    result = invoke_cli("push", artifacts[kind], REPO_ID)

    assert result.exit_code == 0, result.stderr
    assert [call[0] for call in fake_hub.calls] == ["create_repo", "upload_folder"], (
        "a branch was created without --revision"
    )
    assert fake_hub.calls[0][2] == {"private": False, "exist_ok": True}
    upload = fake_hub.calls[1][2]
    assert upload["revision"] is None
    assert upload["commit_message"] == message
    assert f"commit: {COMMIT_URL}" in result.stdout


def test_push_main_revision_creates_no_branch(artifacts, invoke_cli, fake_hub):
    result = invoke_cli("push", artifacts["slice"], REPO_ID, "--revision", "main")

    assert result.exit_code == 0, result.stderr
    assert [call[0] for call in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[1][2]["revision"] == "main"


@pytest.mark.parametrize(
    ("method", "make_error", "expected", "hint"),
    [
        (
            "create_repo",
            lambda: hub_error(
                401,
                "https://huggingface.co/api/repos/create",
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            ),
            "the hub rejected the token (HTTP 401)",
            "hf auth login",
        ),
        (
            "create_repo",
            lambda: hub_error(403, "https://huggingface.co/api/repos/create"),
            "may not write to my-org/",
            "write access",
        ),
        (
            "upload_folder",
            lambda: hub_error(
                404, f"https://huggingface.co/api/models/{REPO_ID}/commit/main", {"X-Error-Code": "RepoNotFound"}
            ),
            f"repo {REPO_ID} not found",
            "hf auth login",
        ),
        (
            "upload_folder",
            lambda: hub_error(500, f"https://huggingface.co/api/models/{REPO_ID}/commit/main"),
            "(HTTP 500)",
            "retry",
        ),
        (
            "upload_folder",
            connection_error,
            "cannot reach the Hugging Face Hub",
            "network",
        ),
        (
            "create_repo",
            lambda: huggingface_hub.errors.LocalTokenNotFoundError("Token is required"),
            "no Hugging Face token found",
            "hf auth login",
        ),
    ],
    ids=["unauthorized", "forbidden", "repo-not-found", "server-error", "connection-refused", "no-token"],
)
def test_push_hub_error_one_line(artifacts, invoke_cli, fake_hub, method, make_error, expected, hint):
    fake_hub.errors[method] = make_error()
    result = invoke_cli("push", artifacts["slice"], REPO_ID)

    line = error_line(result, exit_code=1)
    assert expected in line, f"unexpected error line: {line}"
    assert hint in result.stderr, f"the hint does not mention {hint!r}:\n{result.stderr}"


def test_push_branch_not_found(artifacts, invoke_cli, fake_hub):
    fake_hub.errors["upload_folder"] = hub_error(
        404, f"https://huggingface.co/api/models/{REPO_ID}/commit/v1", {"X-Error-Code": "RevisionNotFound"}
    )

    line = error_line(invoke_cli("push", artifacts["slice"], REPO_ID, "--revision", "v1"), exit_code=1)
    assert f"branch 'v1' not found in {REPO_ID}" in line


def test_push_offline_real_client(artifacts, invoke_cli):
    """The real HfApi with HF_HUB_OFFLINE=1 fails before sending anything."""
    line = error_line(invoke_cli("push", artifacts["slice"], REPO_ID), exit_code=1)

    assert "HF_HUB_OFFLINE=1 is set" in line


# ---------------------------------------------------------------------------------------------
# The CI release example


@pytest.fixture(scope="module")
def release_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build a small elastic checkpoint with two budgets, three shards and a trained tokenizer."""
    folder = tmp_path_factory.mktemp("release") / "nano-tiny"
    folder.mkdir()
    config = tiny_config("MEM*E")
    budgets = importance_budgets(parse_config(config), [("full", 1.0), ("small", 0.5)], seed=11, block=16)
    write_checkpoint(
        folder,
        config,
        seed=11,
        budgets=budgets,
        max_shard_bytes=700_000,
        sidecars={"generation_config.json": '{"eos_token_id": 2}\n'},
    )
    train_tokenizer(load_texts(None)[:200], config["vocab_size"], folder)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="examples/ci/release.sh needs bash")
def test_release_script_end_to_end(release_parent, tmp_path):
    out = tmp_path / "release"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("ELASTIC_DEBUG", "PUSH", "REPO_PREFIX", "REVISION")
    }
    env.update(
        {
            "ELASTIC": f"{sys.executable} -m elastic_cli",
            "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "CALIB_SAMPLES": "2",
            "CALIB_SEQ_LEN": "32",
            "HF_HUB_OFFLINE": "1",
            "HF_ENDPOINT": UNREACHABLE_ENDPOINT,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        }
    )
    completed = subprocess.run(
        ["bash", str(RELEASE_SCRIPT), str(release_parent), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, f"release.sh failed:\n{completed.stderr[-4000:]}"

    inspect = json.loads((out / "inspect.json").read_text())
    assert inspect["valid"] is True
    assert [budget["name"] for budget in inspect["budgets"]] == ["full", "small"]
    expected = {f"bf16/{b}": release_parent for b in ("full", "small")}
    expected["nvfp4-parent"] = release_parent
    expected.update({f"nvfp4/{b}": out / "nvfp4-parent" for b in ("full", "small")})
    for name, parent in expected.items():
        report = verify_artifact(out / name, parent=str(parent))
        assert report.ok, f"{name} does not verify against {parent.name}: {report.problems}"
        assert all(check.passed for check in report.checks), f"{name}: a check did not run: {report.checks}"

    manifest = json.loads((out / "nvfp4-parent" / MANIFEST_FILE).read_text())
    assert manifest["format"] == "NVFP4"
    assert manifest["options"]["calib_samples"] == 2
    assert manifest["options"]["calib_seq_len"] == 32

    reports = {
        "full-BF16": "bf16/full",
        "small-BF16": "bf16/small",
        "NVFP4": "nvfp4-parent",
        "full-NVFP4": "nvfp4/full",
        "small-NVFP4": "nvfp4/small",
    }
    assert sorted(path.stem for path in (out / "push").iterdir()) == sorted(reports)
    for stem, folder in reports.items():
        document = json.loads((out / "push" / f"{stem}.json").read_text())
        assert document["dry_run"] is True, f"{stem} was pushed for real"
        assert document["commit_url"] is None
        assert document["repo_id"] == f"example-org/nano-tiny-{stem}"
        listed = {entry["name"]: {"sha256": entry["sha256"], "size": entry["size"]} for entry in document["files"]}
        assert listed == manifest_files(out / folder), f"push report {stem} does not list exactly the manifest's files"


@pytest.mark.skipif(shutil.which("bash") is None, reason="examples/ci/release.sh needs bash")
def test_release_script_push_needs_token(release_parent, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    env.update({"PUSH": "1", "ELASTIC": f"{sys.executable} -m elastic_cli", "HF_HUB_OFFLINE": "1"})
    completed = subprocess.run(
        ["bash", str(RELEASE_SCRIPT), str(release_parent), str(tmp_path / "release")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 1
    assert "PUSH=1 needs HF_TOKEN" in completed.stderr
    assert not (tmp_path / "release").exists(), "the script wrote output before checking the token"
