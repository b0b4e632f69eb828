"""Nested quantization-aware distillation (QAD) of elastic NemotronH checkpoints.

``fake_quant`` contains the export numerics as differentiable functions, and ``nested`` runs any
budget from the parent's parameters. ``options`` and ``data`` describe a run and its training
sequences. ``train`` contains the loop, its checkpoints and the export, and ``distributed`` the
``torchrun`` and FSDP2 plumbing. ``docs/qad.md`` describes a run.
"""

from elastic_cli.qad.options import QADOptions
from elastic_cli.qad.train import QADResult, QADTrainer, run_qad

__all__ = ["QADOptions", "QADResult", "QADTrainer", "run_qad"]
