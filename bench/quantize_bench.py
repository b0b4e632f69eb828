"""Quantization benchmark: elastic's FP8/NVFP4 functions against ModelOpt's, and quantize RSS.

Part 1 quantizes the same BF16 weights with ``elastic_cli.formats`` and with ModelOpt 0.47.0's
``NVFP4QTensor.quantize`` / ``FP8QTensor.quantize`` in one process, alternating, and reports GB of
BF16 weights per second and the ratio (the best of ``--repeats`` runs each). Part 2 runs
``elastic quantize --format fp8`` (with calibration) on synthetic checkpoints of growing size
with real Nemotron 3 Nano widths and records peak RSS next to the checkpoint size and the sizes of
its largest layer and largest tensor, read from the shard headers. FP8 is used
there because the benchmark checkpoints' random masks do not keep whole blocks of 16, which an
NVFP4 elastic parent needs.

Usage:
    .venv/bin/python bench/quantize_bench.py                  # both parts
    .venv/bin/python bench/quantize_bench.py --skip-rss       # functions only (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elastic_cli.formats import fp8, nvfp4  # noqa: E402

SHAPES = [(1856, 2688), (2688, 1856), (4096, 2688), (10304, 2688)]  # expert up/down, Mamba out/in


def modelopt_quantizers():
    from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor

    def modelopt_nvfp4(weight: torch.Tensor) -> None:
        NVFP4QTensor.quantize(weight, 16)

    def modelopt_fp8(weight: torch.Tensor) -> None:
        FP8QTensor.quantize(weight)

    return modelopt_nvfp4, modelopt_fp8


def elastic_nvfp4(weight: torch.Tensor) -> None:
    nvfp4.quantize(weight, nvfp4.global_scale(fp8.amax(weight)))


def elastic_fp8(weight: torch.Tensor) -> None:
    fp8.quantize(weight, fp8.per_tensor_scale(fp8.amax(weight)))


def best_times(functions: list, weights: list[torch.Tensor], repeats: int) -> list[float]:
    """Time each function over all weights, alternating functions within each repeat.

    Alternating exposes every function to the same changes in machine load. Returns the fastest
    time in seconds of each function, in the order given.
    """
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            started = time.perf_counter()
            for weight in weights:
                function(weight)
            best[index] = min(best[index], time.perf_counter() - started)
    return best


def function_throughput(repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator).to(torch.bfloat16) for shape in SHAPES]
    gigabytes = sum(w.numel() * 2 for w in weights) / 1e9
    modelopt_nvfp4, modelopt_fp8 = modelopt_quantizers()
    rows = []
    for name, ours, theirs in [("nvfp4", elastic_nvfp4, modelopt_nvfp4), ("fp8", elastic_fp8, modelopt_fp8)]:
        ours(weights[0])
        theirs(weights[0])
        elastic_s, modelopt_s = best_times([ours, theirs], weights, repeats)
        rows.append(
            {
                "format": name,
                "bf16_gb": gigabytes,
                "elastic_s": elastic_s,
                "modelopt_s": modelopt_s,
                "elastic_gb_per_s": gigabytes / elastic_s,
                "modelopt_gb_per_s": gigabytes / modelopt_s,
                "speedup": modelopt_s / elastic_s,
            }
        )
    return rows


def tensor_bytes(checkpoint: Path) -> dict[str, int]:
    """Read the byte size of every tensor from the checkpoint's safetensors headers."""
    sizes = {}
    for shard in checkpoint.glob("*.safetensors"):
        with shard.open("rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                sizes[name] = info["data_offsets"][1] - info["data_offsets"][0]
    return sizes


def layer_figures(checkpoint: Path) -> dict[str, int]:
    """Return the largest tensor, the largest layer, and the largest layer without its routed experts, in bytes."""
    sizes = tensor_bytes(checkpoint)
    layers: dict[int, int] = {}
    layers_without_experts: dict[int, int] = {}
    for name, nbytes in sizes.items():
        match = re.match(r"backbone\.layers\.(\d+)\.", name)
        if match is None:
            continue
        layer = int(match.group(1))
        layers[layer] = layers.get(layer, 0) + nbytes
        if ".mixer.experts." not in name:
            layers_without_experts[layer] = layers_without_experts.get(layer, 0) + nbytes
    return {
        "largest_tensor_bytes": max(sizes.values()),
        "largest_layer_bytes": max(layers.values()),
        "largest_layer_without_routed_experts_bytes": max(layers_without_experts.values()),
    }


def quantize_rss(checkpoints: list[Path], workdir: Path) -> list[dict]:
    rows = []
    for checkpoint in checkpoints:
        size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        output = workdir / f"q-{checkpoint.name}"
        command = [
            sys.executable, "-m", "elastic_cli", "quantize", str(checkpoint), "--format", "fp8", "--recipe", "experts",
            "--calib-samples", "2", "--calib-seq-len", "32", "--output", str(output), "--overwrite", "-q",
        ]
        started = time.perf_counter()
        # preexec_fn forces fork+exec, so the child's ru_maxrss starts from its own image and not
        # from this benchmark process's peak (which a vfork/posix_spawn child reports).
        child = subprocess.Popen(command, preexec_fn=lambda: None)
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - started
        rows.append(
            {
                "checkpoint": checkpoint.name,
                "checkpoint_bytes": size,
                **layer_figures(checkpoint),
                "exit_status": status,
                "seconds": elapsed,
                "peak_rss_bytes": usage.ru_maxrss * 1024,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Runs per function; the fastest counts.")
    parser.add_argument("--skip-rss", action="store_true", help="Only measure the quantize functions.")
    parser.add_argument(
        "--checkpoints", type=Path, nargs="*", default=[],
        help="Checkpoints for the RSS part (with a tokenizer); built by bench/slice_bench.py plus a tokenizer.",
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "quantize-work")
    args = parser.parse_args()

    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average_start": os.getloadavg(),
        },
        "functions": function_throughput(args.repeats),
    }
    if not args.skip_rss and args.checkpoints:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report["quantize_rss"] = quantize_rss(args.checkpoints, args.workdir)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["self_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print("| format | BF16 GB | elastic GB/s | ModelOpt GB/s | elastic speedup |")
    print("|---|---|---|---|---|")
    for row in report["functions"]:
        print(
            f"| {row['format']} | {row['bf16_gb']:.3f} | {row['elastic_gb_per_s']:.3f} | "
            f"{row['modelopt_gb_per_s']:.3f} | {row['speedup']:.2f}x |"
        )
    for row in report.get("quantize_rss", []):
        print(
            f"{row['checkpoint']}: {row['checkpoint_bytes'] / 1e9:.2f} GB, largest layer "
            f"{row['largest_layer_bytes'] / 1e9:.2f} GB "
            f"({row['largest_layer_without_routed_experts_bytes'] / 1e9:.2f} GB without routed experts), "
            f"largest tensor {row['largest_tensor_bytes'] / 1e9:.2f} GB, "
            f"peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB, {row['seconds']:.1f} s, exit status {row['exit_status']}"
        )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"quantize-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
