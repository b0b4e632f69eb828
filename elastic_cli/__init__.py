"""elastic: inspect, slice, quantize and verify NVIDIA elastic (nested) NemotronH checkpoints."""

__version__ = "0.1.0"
