"""Nested quantization-aware distillation (QAD) of elastic NemotronH checkpoints.

``fake_quant`` contains the export numerics as differentiable functions, and ``nested`` runs any
budget from the parent's parameters. ``options`` and ``data`` describe a run and its training
sequences. ``train`` contains the loop, its checkpoints and the export, and ``distributed`` the
``torchrun`` and FSDP2 plumbing. ``evaluate`` computes held-out perplexity per budget before and
after training. ``docs/qad.md`` describes a run.

Import the submodules themselves: this package imports none of them, so that the command line
reads ``options`` without loading torch.
"""
