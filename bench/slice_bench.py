"""Benchmark ``elastic slice``: time against a plain copy of the output, and peak RSS against size.

For each requested size, the script builds (or reuses) a synthetic elastic checkpoint with three
nested budgets (full 1.0, mid 0.75, small 0.5). Its widths are those of Nemotron 3 Nano: hidden
2688, 64 Mamba heads of 64 in 8 groups, state 128, 32 query and 2 KV heads of 128, experts of
width 1856 and a shared expert of 3712. The vocabulary, the number of routed experts and the
number of MoE layers set the size, as chosen by :func:`choose_layout`.

Each measurement runs the real command line (``python -m elastic_cli -q slice``) in a fresh
child process, started by a small helper process, and reads the child's wall time, CPU time
(user plus system) and peak RSS (``ru_maxrss`` from ``os.wait4``). Source shards are 1 GB, and
output shards use the command's default of 5 GB. Before every run the source shards are read
once, so the slicer reads a warm page cache. The baseline copies the safetensors shards that
this slice wrote to another folder of the same file system with ``shutil.copyfile``, then
fsyncs each file, as the slicer fsyncs each shard. Its source, the just-written output, is also
in the page cache. Slice and copy alternate ``--repeats`` times and the minimum of each is
kept, so both see the same disk and the same competing load.

Sizes are decimal: 1 GB = 10^9 bytes, 1 MB = 10^6 bytes.

Usage:
    python bench/slice_bench.py                 # sizes 1, 2 and 4 GB
    python bench/slice_bench.py --sizes 1,2,4 --repeats 3
    python bench/slice_bench.py --quick         # one ~0.4 GB checkpoint, a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.elastic.slicer import plan_budgets
from elastic_cli.elastic.source import open_source
from elastic_cli.synthetic import importance_budgets, nano_v3_config, template_shapes, tensor_dtype, write_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
SEED = 2026
FRACTIONS = [("full", 1.0), ("mid", 0.75), ("small", 0.5)]
SELECTIONS = ("small", "all")
SOURCE_SHARD_BYTES = 1000**3
QUICK_SIZE_GB = 0.4
GB = 1000**3
MB = 1000**2
BUFFER_BYTES = 5 * 4 * 1024**2  # the slicer's four ring buffers and its scratch array

# The real vocabulary comes first. Smaller ones serve only targets too small for it.
VOCAB_SIZES = (131072, 65536, 32768, 16384, 8192)
EXPERT_COUNTS = (8, 16, 32, 64, 128)
MAX_MOE_LAYERS = 64
SIZE_TOLERANCE = 0.15


@dataclass(frozen=True)
class Layout:
    """The parameters that set a synthetic checkpoint's size. Every width is the real Nano width."""

    vocab_size: int
    n_routed_experts: int
    pattern: str

    def config(self) -> dict[str, Any]:
        return nano_v3_config(
            vocab_size=self.vocab_size, n_routed_experts=self.n_routed_experts, hybrid_override_pattern=self.pattern
        )


@dataclass(frozen=True)
class ChildRun:
    """Wall time, CPU time (user plus system) and peak resident set size of one child process."""

    wall_s: float
    cpu_s: float
    max_rss_bytes: int


def tensor_sizes(config: dict[str, Any]) -> dict[str, int]:
    """Return the byte size of every tensor a checkpoint of ``config`` stores."""
    shapes = template_shapes(parse_config(config))
    return {name: math.prod(shape) * tensor_dtype(name).itemsize for name, shape in shapes.items()}


def moe_pattern(moe_layers: int) -> str:
    """Return a layer pattern with ``moe_layers`` MoE layers, each after a Mamba layer, and one attention layer."""
    return "M*E" + "ME" * (moe_layers - 1)


@functools.lru_cache(maxsize=None)
def layout_bytes(vocab_size: int, experts: int, moe_layers: int) -> int:
    """Return the checkpoint size of a layout, from the sizes of one- and two-block patterns."""
    if moe_layers > 2:
        one_block, two_blocks = layout_bytes(vocab_size, experts, 1), layout_bytes(vocab_size, experts, 2)
        return one_block + (moe_layers - 1) * (two_blocks - one_block)
    return sum(tensor_sizes(Layout(vocab_size, experts, moe_pattern(moe_layers)).config()).values())


def choose_layout(target_bytes: float) -> Layout:
    """Pick the layout for a target size: the real vocabulary and many experts where they fit.

    Among layouts within ``SIZE_TOLERANCE`` of the target, the largest vocabulary wins, so the
    largest tensor is the real 704 MB embedding whenever it fits. Next come the most experts,
    because routed experts are 93% of the real checkpoint's bytes, then the nearest size. When
    no layout is that close, the nearest one wins.
    """
    candidates = []
    for vocab in VOCAB_SIZES:
        for experts in EXPERT_COUNTS:
            for moe_layers in range(1, MAX_MOE_LAYERS + 1):
                size = layout_bytes(vocab, experts, moe_layers)
                error = abs(math.log(size / target_bytes))
                candidates.append((error, vocab, experts, moe_layers))
                if size > target_bytes:
                    break
    close = [candidate for candidate in candidates if candidate[0] <= math.log(1 + SIZE_TOLERANCE)]
    if close:
        _, vocab, experts, moe_layers = min(close, key=lambda c: (-c[1], -c[2], c[0]))
    else:
        _, vocab, experts, moe_layers = min(candidates)
    return Layout(vocab, experts, moe_pattern(moe_layers))


def build_checkpoint(workdir: Path, layout: Layout) -> Path:
    """Write the synthetic checkpoint of ``layout`` under ``workdir``, or reuse a complete one."""
    config = layout.config()
    inputs = {"config": config, "seed": SEED, "fractions": FRACTIONS, "shard": SOURCE_SHARD_BYTES}
    key = json.dumps(inputs, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = workdir / "checkpoints" / f"nano-v{layout.vocab_size}-e{layout.n_routed_experts}-{digest}"
    marker = folder / ".complete"
    if marker.exists():
        return folder

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    budgets = importance_budgets(parse_config(config), FRACTIONS, SEED)
    write_checkpoint(folder, config, SEED, budgets, max_shard_bytes=SOURCE_SHARD_BYTES)
    marker.write_text(key + "\n")
    print(f"built {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return folder


def shard_files(folder: Path) -> list[Path]:
    """List every safetensors shard in ``folder`` and its subfolders."""
    return sorted(folder.rglob("*.safetensors"))


def read_through(files: list[Path]) -> None:
    """Read every file once so that its pages sit in the page cache."""
    buffer = bytearray(64 * MB)
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


# Runs argv[2:] and writes its wall time, CPU time and peak RSS (KiB) to argv[1]. Python's
# subprocess and posix_spawn start children with vfork, and at exec Linux records the peak RSS of
# the shared address space as the child's own. A child started straight from this benchmark would
# therefore report at least the benchmark's peak RSS. The helper's own peak of about 10 MB is the
# floor instead.
MEASURE_HELPER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(sys.argv[1], "w") as handle:
    json.dump({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kib": usage.ru_maxrss}, handle)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(command: list[str], workdir: Path) -> ChildRun:
    """Run ``command`` through the measuring helper and return its wall time, CPU time and peak RSS.

    Raises:
        RuntimeError: If the command fails, with its output.
    """
    report = workdir / "child-usage.json"
    report.unlink(missing_ok=True)
    helper = [sys.executable, "-c", MEASURE_HELPER, str(report), *command]
    completed = subprocess.run(helper, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        output = completed.stdout.decode()
        raise RuntimeError(f"{' '.join(command)} failed with exit code {completed.returncode}:\n{output}")
    usage = json.loads(report.read_text())
    return ChildRun(wall_s=usage["wall_s"], cpu_s=usage["cpu_s"], max_rss_bytes=usage["max_rss_kib"] * 1024)


def slice_command(checkpoint: Path, selection: str, output: Path, dry_run: bool = False) -> list[str]:
    command = [sys.executable, "-m", "elastic_cli", "-q", "slice", str(checkpoint), "--budget", selection]
    command += ["--output", str(output), "--overwrite"]
    return command + (["--dry-run"] if dry_run else [])


def copy_with_fsync(files: list[Path], source_root: Path, destination: Path) -> tuple[float, float]:
    """Copy ``files`` into ``destination`` under the same relative paths and fsync each file.

    Returns:
        The wall and CPU seconds of this process (``shutil.copyfile`` copies in the kernel with
        ``sendfile`` on Linux, which counts as this process's system time).
    """
    started = time.perf_counter()
    started_cpu = time.process_time()
    for path in files:
        target = destination / path.relative_to(source_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        descriptor = os.open(target, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return time.perf_counter() - started, time.process_time() - started_cpu


def memory_model(checkpoint: Path, selection: str) -> dict[str, int]:
    """Estimate the slicer's working set from the headers.

    The slicer maps one source tensor at a time and cuts it block by block into a ring of four
    4 MiB buffers; rows gathered before their columns are cut go to a scratch array of at most
    one more buffer. So the estimate is the largest tensor plus ``BUFFER_BYTES``. It leaves out
    the allocator's own overhead.
    """
    source = open_source(str(checkpoint))
    try:
        plan_budgets(source, [selection])  # the same checks as the command
        largest = max(info.nbytes for info in source.checkpoint.tensors.values())
    finally:
        source.close()
    return {"largest_tensor_bytes": largest, "tensor_plus_buffers_bytes": largest + BUFFER_BYTES}


def measure_selection(checkpoint: Path, selection: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """Slice ``selection`` and copy its output, alternating ``repeats`` times, and keep each minimum."""
    output = workdir / "out" / selection
    copy = workdir / "copy" / selection
    source_files = shard_files(checkpoint)
    slices: list[ChildRun] = []
    copies: list[tuple[float, float]] = []
    written: list[Path] = []
    for _ in range(repeats):
        shutil.rmtree(output, ignore_errors=True)  # so --overwrite has no old output to delete
        read_through(source_files)
        slices.append(run_child(slice_command(checkpoint, selection, output), workdir))

        written = shard_files(output)
        shutil.rmtree(copy, ignore_errors=True)
        read_through(written)
        copies.append(copy_with_fsync(written, output, copy))

    largest_shard = max(path.stat().st_size for path in written)
    output_bytes = sum(path.stat().st_size for path in written)
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    slice_s = min(run.wall_s for run in slices)
    copy_s = min(wall for wall, _ in copies)
    return {
        "selection": selection,
        "output_bytes": output_bytes,
        "largest_output_shard_bytes": largest_shard,
        "slice_s": slice_s,
        "copy_s": copy_s,
        "ratio": slice_s / copy_s,
        "slice_cpu_s": min(run.cpu_s for run in slices),
        "copy_cpu_s": min(cpu for _, cpu in copies),
        "slice_runs_s": [run.wall_s for run in slices],
        "copy_runs_s": [wall for wall, _ in copies],
        "peak_rss_bytes": max(run.max_rss_bytes for run in slices),
        **memory_model(checkpoint, selection),
    }


def measure_size(target_gb: float, workdir: Path, repeats: int) -> dict[str, Any]:
    """Build the checkpoint for one target size, then measure a dry run and every selection on it.

    The dry run (``--budget all --dry-run``) imports, reads headers and plans, but reads no
    tensor data, so its time and peak RSS are the fixed part of every slice.
    """
    layout = choose_layout(target_gb * GB)
    checkpoint = build_checkpoint(workdir, layout)
    sizes = tensor_sizes(layout.config())
    dry_command = slice_command(checkpoint, "all", workdir / "out" / "dry-run", dry_run=True)
    dry_runs = [run_child(dry_command, workdir) for _ in range(repeats)]
    result: dict[str, Any] = {
        "target_gb": target_gb,
        "layout": asdict(layout),
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": sum(sizes.values()),
        "tensors": len(sizes),
        "dry_run_s": min(run.wall_s for run in dry_runs),
        "dry_run_cpu_s": min(run.cpu_s for run in dry_runs),
        "dry_run_runs_s": [run.wall_s for run in dry_runs],
        "dry_run_rss_bytes": max(run.max_rss_bytes for run in dry_runs),
        "selections": [],
    }
    for selection in SELECTIONS:
        print(f"measuring {selection} on {checkpoint.name}", file=sys.stderr)
        result["selections"].append(measure_selection(checkpoint, selection, workdir, repeats))
    return result


def machine() -> dict[str, Any]:
    """Describe the machine and the load on it."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    status = ["git", "status", "--porcelain", "--", "elastic_cli", "pyproject.toml"]
    changes = subprocess.run(status, cwd=REPO_ROOT, capture_output=True, text=True).stdout
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(total_kib / 1024**2, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "uncommitted_product_changes": bool(changes.strip()),
        "load_average_start": os.getloadavg(),
    }


def render_tables(results: list[dict[str, Any]]) -> str:
    """Render the measurements as two markdown tables: time, then memory."""
    time_rows = [
        "| checkpoint | budgets | written | slice | slice CPU | dry run | copy | copy CPU | slice / copy "
        "| (slice − dry run) / copy |",
        "|" + "---|" * 10,
    ]
    memory_rows = [
        "| checkpoint | vocab / experts / pattern | tensors | budgets | peak RSS | dry-run RSS "
        "| peak − dry-run | largest tensor | tensor + buffers | largest output shard |",
        "|" + "---|" * 10,
    ]
    for result in results:
        layout = result["layout"]
        checkpoint = f"{result['checkpoint_bytes'] / GB:.2f} GB"
        for entry in result["selections"]:
            time_cells = [
                checkpoint,
                entry["selection"],
                f"{entry['output_bytes'] / GB:.2f} GB",
                f"{entry['slice_s']:.1f} s",
                f"{entry['slice_cpu_s']:.1f} s",
                f"{result['dry_run_s']:.1f} s",
                f"{entry['copy_s']:.1f} s",
                f"{entry['copy_cpu_s']:.1f} s",
                f"{entry['ratio']:.2f}",
                f"{(entry['slice_s'] - result['dry_run_s']) / entry['copy_s']:.2f}",
            ]
            memory_cells = [
                checkpoint,
                f"{layout['vocab_size']} / {layout['n_routed_experts']} / `{layout['pattern']}`",
                str(result["tensors"]),
                entry["selection"],
                f"{entry['peak_rss_bytes'] / MB:.0f} MB",
                f"{result['dry_run_rss_bytes'] / MB:.0f} MB",
                f"{(entry['peak_rss_bytes'] - result['dry_run_rss_bytes']) / MB:.0f} MB",
                f"{entry['largest_tensor_bytes'] / MB:.0f} MB",
                f"{entry['tensor_plus_buffers_bytes'] / MB:.0f} MB",
                f"{entry['largest_output_shard_bytes'] / MB:.0f} MB",
            ]
            time_rows.append("| " + " | ".join(time_cells) + " |")
            memory_rows.append("| " + " | ".join(memory_cells) + " |")
    return "\n".join(time_rows) + "\n\n" + "\n".join(memory_rows)


def parse_sizes(text: str) -> list[float]:
    try:
        sizes = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --sizes {text!r}; expected GB values such as 1,2,4") from None
    if not sizes or any(size <= 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"invalid --sizes {text!r}; expected positive GB values such as 1,2,4")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=[1.0, 2.0, 4.0],
        help="Checkpoint sizes in GB (10^9 bytes), comma-separated.",
    )
    quick_help = f"Measure one {QUICK_SIZE_GB} GB checkpoint instead of --sizes."
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--repeats", type=int, default=2, help="Slice and copy runs per measurement; the minimum of each counts."
    )
    parser.add_argument(
        "--workdir", type=Path, default=RESULTS / "slice-work", help="Folder for the cached checkpoints and outputs."
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    sizes = [QUICK_SIZE_GB] if args.quick else args.sizes
    args.workdir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"command": sys.argv, "machine": machine(), "repeats": args.repeats}
    record["results"] = []
    for size in sizes:
        record["results"].append(measure_size(size, args.workdir.resolve(), args.repeats))
    record["machine"]["load_average_end"] = os.getloadavg()

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"slice-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(render_tables(record["results"]))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
