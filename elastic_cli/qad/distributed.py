"""Process groups and FSDP2 sharding for QAD under ``torchrun``.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) everything runs in
one process and nothing here communicates. Under ``torchrun`` each process joins the default
process group (NCCL on CUDA, gloo on CPU). The student and the teacher are sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``), one unit per parent layer plus a root unit for the
embeddings, the final norm and ``lm_head``. FSDP2 averages gradients over processes when it
reduce-scatters them, so a loss scaled by the process count gives the gradient of the whole
global batch.

FSDP2 reduce-scatters the gradients of the parameters a step used, so every process must use
the same parameters in a step, or the collectives mismatch and the run fails. The nested forward
guarantees that: all processes run the same budget, and the routed experts of a layer are stacked
into one tensor before routing, so which experts the tokens reach does not change which parameters
get a gradient.

FSDP2 with gloo on CPU runs every collective QAD needs (all-gather, reduce-scatter, all-reduce,
broadcast) with torch 2.13.0; the two-process CPU test in ``tests/test_qad.py`` runs this path.
NOTE: the NCCL path on GPUs runs the same calls but has not been run by the test suite.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from elastic_cli.errors import ElasticError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rank 0 calibrates and exports while the other ranks wait in a collective, which can take far
# longer than the default 10 (NCCL) or 30 (gloo) minutes on a full-size model.
COLLECTIVE_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class DistContext:
    """A process's rank, the process count and the compute device.

    Attributes:
        rank: This process's rank, 0 without ``torchrun``.
        world_size: Number of processes.
        device: The device this process computes on.
        owns_group: True when :func:`init_distributed` created the process group (and so
            :func:`close` destroys it).
    """

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes, or return a single-process context.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cuda`` or ``cpu``. Under
            ``torchrun`` a CUDA process uses ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: For an unknown device name, or ``cuda`` without a CUDA device.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device!r} is not one of auto, cuda, cpu")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size <= 1:
        return DistContext(0, 1, target)

    owns_group = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
        owns_group = True
    context = DistContext(dist.get_rank(), dist.get_world_size(), target, owns_group)
    log.debug("rank %d of %d on %s (%s)", context.rank, context.world_size, target, dist.get_backend())
    return context


def close(context: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module, units: list[nn.Module], context: DistContext) -> None:
    """Shard a meta-device model with FSDP2: each of ``units``, then the root. No-op in one process."""
    if not context.is_distributed:
        return
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)
    fully_shard(model)


def materialize(model: nn.Module, read: Callable[[str], torch.Tensor], context: DistContext) -> None:
    """Allocate a meta-device (possibly sharded) model on the device and fill it from ``read``.

    Every process reads each full tensor (one at a time) and keeps only its own FSDP2 shard, so
    no process keeps more than one full tensor beyond its shards.

    Args:
        model: The model, built on the meta device and already passed to :func:`shard`.
        read: Returns the full tensor of a parameter or buffer name, in any dtype.
        context: The process context.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=context.device)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            full = read(name).to(device=context.device, dtype=tensor.dtype)
            if isinstance(tensor, DTensor):
                local = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(local.to_local())
            else:
                tensor.copy_(full)


def full_tensors(model: nn.Module, context: DistContext) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` for every parameter and buffer, one at a time.

    Every process must consume the whole iterator, because gathering a sharded tensor is a
    collective call. The tensors are on the compute device.
    """
    from torch.distributed.tensor import DTensor

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        value = tensor.detach()
        yield name, value.full_tensor() if isinstance(value, DTensor) else value


def set_gradient_sync(model: nn.Module, enabled: bool, context: DistContext) -> None:
    """Turn FSDP2's gradient reduce-scatter on or off (off for all but the last micro-batch)."""
    if context.is_distributed:
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]


def all_reduce_sum(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Return the sum of ``value`` over processes (``value`` itself in one process)."""
    if not context.is_distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_object(value: object, context: DistContext) -> object:
    """Return rank 0's ``value`` on every process."""
    if not context.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def run_on_main(function: Callable[[], T], context: DistContext, action: str) -> T | None:
    """Run ``function`` on rank 0 alone and return its result there (``None`` on other ranks).

    If it raises, rank 0 re-raises the error and every other rank raises :class:`ElasticError`,
    so no process waits for a rank that has already failed.

    Args:
        function: The work only rank 0 does.
        context: The process context.
        action: What the work is, for the other ranks' error message ("exporting").
    """
    result: T | None = None
    failure: Exception | None = None
    if context.is_main:
        try:
            result = function()
        except Exception as error:  # re-raised below, after telling the other ranks
            failure = error
    message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}", context)
    if failure is not None:
        raise failure
    if message is not None:
        raise ElasticError(f"rank 0 failed while {action}: {message}", "see rank 0's log for the cause")
    return result


def barrier(context: DistContext) -> None:
    """Wait until every process arrives (no-op in one process)."""
    if context.is_distributed:
        dist.barrier()
