"""Build a random-weight elastic NemotronH checkpoint with three nested budgets.

The layer pattern follows Nemotron 3 Nano (Mamba-2, MoE and attention layers; GQA; grouped
Mamba heads; top-k routed experts plus a shared expert) at a width that fits in a few MB. The
weights are random but deterministic, so the same command always writes the same bytes.
Budgets are named after their parameter counts, the way NVIDIA names the 30B/23B/12B children.
The embedded example, ``examples/nano-elastic-tiny``, is the trained model that
``examples/train_example.py`` writes; this script is for quick experiments without training.

Usage:
    python examples/build_example.py /tmp/random-elastic
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.safetensors_io import TensorInfo
from elastic_cli.checkpoint.torch_dtypes import TORCH_TO_DTYPE
from elastic_cli.elastic.masks import Budget
from elastic_cli.elastic.plan import build_plan
from elastic_cli.quantize.calib_data import load_texts
from elastic_cli.synthetic import importance_budgets, template_shapes, tensor_dtype, tiny_config, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_tokenizer import train_tokenizer  # noqa: E402

PATTERN = "MEMEM*EMEMEM*EME"
FRACTIONS = [1.0, 0.75, 0.5]
SEED = 2026

SIDECARS = {
    "generation_config.json": '{\n  "bos_token_id": 1,\n  "eos_token_id": 2,\n  "pad_token_id": 3\n}\n',
}


def params_name(count: int) -> str:
    """Name a budget after its parameter count, such as ``12M``."""
    return f"{count / 1e6:.0f}M"


def build(folder: Path) -> list[str]:
    """Write the example into ``folder`` (replaced if present); return the budget names."""
    config = tiny_config(
        PATTERN,
        vocab_size=4096,
        hidden_size=256,
        mamba_num_heads=16,
        mamba_head_dim=16,
        n_groups=4,
        ssm_state_size=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256,
    )
    arch = parse_config(config)
    shapes = template_shapes(arch)
    infos = {
        name: TensorInfo(Path(), TORCH_TO_DTYPE[tensor_dtype(name)], shape, 0, 0) for name, shape in shapes.items()
    }
    ranked = importance_budgets(arch, [(f"b{i}", fraction) for i, fraction in enumerate(FRACTIONS)], SEED, block=16)
    budgets = []
    for budget in ranked:
        params = build_plan(arch, config, infos, budget).params
        budgets.append(Budget(params_name(params), params, False, budget.hidden, budget.layers, budget.layer_masks))

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_checkpoint(folder, config, SEED, budgets, max_shard_bytes=8 * 1000**2, sidecars=SIDECARS)
    train_tokenizer(load_texts(None), config["vocab_size"], folder)
    return [budget.name for budget in budgets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Folder to write the example checkpoint into (replaced).")
    args = parser.parse_args()
    names = build(args.folder)
    print(f"wrote {args.folder} with budgets {', '.join(names)}", file=sys.stderr)


if __name__ == "__main__":
    main()
