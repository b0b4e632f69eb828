"""One process of a multi-process QAD run, for ``python -m torch.distributed.run``.

Every process calls ``run_qad`` with the same arguments, and rank 0 writes the loss history as
JSON. ``tests/test_qad.py`` forks its processes and calls :func:`main` with the environment
variables ``torchrun`` would set.

Usage:
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/qad_worker.py \\
        PARENT OUTPUT --state STATE.json --tokens TOKENS.pt --options OPTIONS.json --history HISTORY.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic_cli.qad.options import QADOptions  # noqa: E402
from elastic_cli.qad.train import read_state_argument, run_qad  # noqa: E402
from elastic_cli.quantize.pipeline import QuantizeOptions  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (``argv``, or ``sys.argv``) and run this process's share of QAD."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parent", type=Path, help="BF16 elastic parent folder.")
    parser.add_argument("output", type=Path, help="Quantized output folder.")
    parser.add_argument("--state", type=Path, required=True, help="elastic_quant_state.json to start from.")
    parser.add_argument(
        "--tokens", type=Path, required=True, help="Token ids, int64 [sequences, seq_len], written by torch.save."
    )
    parser.add_argument("--options", type=Path, required=True, help="JSON of QADOptions fields.")
    parser.add_argument("--format", default="nvfp4", help="Quantization format.")
    parser.add_argument("--history", type=Path, required=True, help="Where rank 0 writes the step records.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fields = json.loads(args.options.read_text())
    for name in ("checkpoint_dir", "data"):
        if fields.get(name) is not None:
            fields[name] = Path(fields[name])
    if fields.get("budget_probabilities") is not None:
        fields["budget_probabilities"] = tuple(fields["budget_probabilities"])
    options = QADOptions(**fields)
    token_ids = torch.load(args.tokens, weights_only=True)

    result = run_qad(
        str(args.parent),
        QuantizeOptions(format=args.format),
        args.output,
        options,
        state=read_state_argument(args.state),
        token_ids=token_ids,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        records = [dataclasses.asdict(record) for record in result.history]
        args.history.write_text(json.dumps({"steps": result.steps, "history": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
