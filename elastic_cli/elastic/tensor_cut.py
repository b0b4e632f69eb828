"""Cut torch tensors with the slicer's numpy cutter, so both give the same bytes."""

from __future__ import annotations

import numpy as np
import torch

from elastic_cli.elastic.cut import ArrayCutter
from elastic_cli.elastic.plan import Keep

# Element size in bytes -> torch integer dtype of that size, matching the cutter's numpy dtypes.
_TORCH_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class TensorCutter:
    """Applies keep indices to CPU tensors; see :class:`elastic_cli.elastic.cut.ArrayCutter`."""

    def __init__(self) -> None:
        self._arrays = ArrayCutter()

    def cut(self, tensor: torch.Tensor, keep: tuple[Keep, ...], pad_value: float = 0.0) -> torch.Tensor:
        """Keep the listed entries of each dimension; ``-1`` entries become ``pad_value``.

        Returns a contiguous tensor of the input's dtype, which may share memory with the
        input when the cut is a single run of rows.
        """
        bits = _TORCH_BITS[tensor.element_size()]
        array = tensor.detach().contiguous().view(bits).numpy()
        pad = int(torch.tensor(pad_value, dtype=tensor.dtype).view(bits))
        cut = np.ascontiguousarray(self._arrays.cut(array, keep, pad))
        return torch.from_numpy(cut).view(tensor.dtype)
