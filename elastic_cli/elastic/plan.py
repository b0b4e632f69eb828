"""Slice plans: pure data computed from headers and masks, before any tensor is read.

A :class:`SlicePlan` lists, for one budget, every output tensor with its source tensor and the
keep indices along each dimension (``None`` keeps the whole dimension; ``-1`` inserts a zero
entry, used to pad per-layer FFN widths to the common width the config can state), plus the
rewritten ``config.json``. Executing a plan is mechanical; everything that can go wrong
structurally goes wrong here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from elastic_cli.arch.nemotron_h import (
    KIND_TO_CHAR,
    KIND_TO_NATIVE,
    Dim,
    LayerKind,
    NemotronHArch,
    parse_tensor_name,
    template_dims,
)
from elastic_cli.checkpoint.safetensors_io import DTYPE_SIZES, TensorInfo
from elastic_cli.elastic.masks import Axis, Budget
from elastic_cli.elastic.validate import group_counts
from elastic_cli.errors import CheckpointError, MaskError
from elastic_cli.formats.constants import NVFP4_BLOCK_SIZE
from elastic_cli.quantize.export import BLOCK_SCALE_PAD, PACKED_DTYPE, quantized_shape, split_quantized_name

Keep = tuple[int, ...] | None


@dataclass(frozen=True)
class TensorSlice:
    """One output tensor: where it comes from and which entries of each dimension it keeps."""

    source: str
    target: str
    dtype: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    keep: tuple[Keep, ...]
    pad_value: float = 0.0

    @property
    def is_copy(self) -> bool:
        """True when the output is the source tensor unchanged."""
        return all(indices is None for indices in self.keep)

    @property
    def nbytes(self) -> int:
        return math.prod(self.target_shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SlicePlan:
    """Everything needed to write one budget's standalone checkpoint.

    Attributes:
        budget: The budget name.
        config: The rewritten ``config.json`` in the source dialect.
        tensors: Output tensors in write order (natural name order).
        layer_map: The parent index of each output layer.
        params: Parameters stored in the output.
        active_params: Parameters used per token (all but the unselected routed experts).
    """

    budget: str
    config: dict[str, Any]
    tensors: tuple[TensorSlice, ...]
    layer_map: tuple[int, ...]
    params: int
    active_params: int

    @property
    def total_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def module_map(self) -> dict[str, str]:
        """Parent module name to child module name, for every module with a weight."""
        suffix = ".weight"
        return {t.source[: -len(suffix)]: t.target[: -len(suffix)] for t in self.tensors if t.source.endswith(suffix)}


def kept(mask: tuple[bool, ...]) -> tuple[int, ...]:
    """Return the indices a keep-mask keeps, ascending."""
    return tuple(i for i, keep in enumerate(mask) if keep)


def _padded(indices: tuple[int, ...], width: int) -> tuple[int, ...]:
    return indices + (-1,) * (width - len(indices))


@dataclass(frozen=True)
class _LayerKeep:
    """Keep indices of every sliceable dimension of one layer."""

    dims: dict[Dim, Keep]
    experts: tuple[int, ...] | None


def _mamba_keep(arch: NemotronHArch, budget: Budget, layer: int) -> dict[Dim, Keep]:
    heads = kept(budget.mask(Axis.MAMBA_HEADS, layer))
    channels = kept(budget.mask(Axis.MAMBA_HEAD_CHANNELS, layer))
    hd, di, state = arch.mamba_head_dim, arch.mamba_inner, arch.ssm_state_size
    gn = arch.n_groups * state
    counts = group_counts(budget.mask(Axis.MAMBA_HEADS, layer), arch.n_groups)
    groups = [g for g, count in enumerate(counts) if count]

    inner = tuple(h * hd + c for h in heads for c in channels)  # z, x and the gated norm are head-major
    group_rows = tuple(g * state + n for g in groups for n in range(state))  # B and C are group-major
    in_proj = (
        inner  # z
        + tuple(di + i for i in inner)  # x
        + tuple(2 * di + r for r in group_rows)  # B
        + tuple(2 * di + gn + r for r in group_rows)  # C
        + tuple(2 * di + 2 * gn + h for h in heads)  # dt
    )
    conv = inner + tuple(di + r for r in group_rows) + tuple(di + gn + r for r in group_rows)
    return {Dim.MAMBA_IN_PROJ: in_proj, Dim.MAMBA_CONV: conv, Dim.MAMBA_INNER: inner, Dim.MAMBA_HEADS: heads}


def _attention_keep(arch: NemotronHArch, budget: Budget, layer: int) -> dict[Dim, Keep]:
    heads = kept(budget.mask(Axis.ATTENTION_HEADS, layer))
    return {Dim.ATTENTION_Q: tuple(h * arch.head_dim + d for h in heads for d in range(arch.head_dim))}


def _compact(indices: tuple[int, ...], length: int | None) -> Keep:
    """Return ``None`` when the indices keep a whole dimension in order."""
    if length is not None and indices == tuple(range(length)):
        return None
    return indices


def build_plan(
    arch: NemotronHArch, config: dict[str, Any], tensors: dict[str, TensorInfo], budget: Budget
) -> SlicePlan:
    """Plan the standalone checkpoint of one budget.

    Args:
        arch: The parent architecture.
        config: The parent ``config.json``.
        tensors: The parent's tensors (name to header info), in natural order.
        budget: A validated budget.

    Returns:
        The slice plan.

    Raises:
        CheckpointError: If a tensor is unknown to the NemotronH layout or its shape contradicts
            the config.
        MaskError: If the budget cannot be expressed by a stock config.
    """
    check_tensors(arch, tensors)
    layer_map = kept(budget.layers)
    new_index = {parent: child for child, parent in enumerate(layer_map)}
    hidden = kept(budget.hidden)

    widths = _common_widths(arch, budget, layer_map)
    layer_keeps: dict[int, _LayerKeep] = {}
    for layer in layer_map:
        kind = arch.layer_kinds[layer]
        dims: dict[Dim, Keep] = {}
        experts = None
        if kind is LayerKind.MAMBA:
            dims = _mamba_keep(arch, budget, layer)
        elif kind is LayerKind.ATTENTION:
            dims = _attention_keep(arch, budget, layer)
        elif kind is LayerKind.MLP:
            dims = {Dim.FFN: _padded(kept(budget.mask(Axis.FFN_CHANNELS, layer)), widths[Dim.FFN])}
        else:
            experts = kept(budget.mask(Axis.EXPERTS, layer))
            dims = {
                Dim.EXPERTS: experts,
                Dim.EXPERT_FFN: _padded(kept(budget.mask(Axis.EXPERT_CHANNELS, layer)), widths[Dim.EXPERT_FFN]),
                Dim.SHARED_FFN: _padded(kept(budget.mask(Axis.SHARED_EXPERT_CHANNELS, layer)), widths[Dim.SHARED_FFN]),
            }
        dims[Dim.HIDDEN] = hidden
        layer_keeps[layer] = _LayerKeep(dims={dim: _compact(ix, arch.dim_size(dim)) for dim, ix in dims.items()}, experts=experts)
    global_keep = {Dim.HIDDEN: _compact(hidden, arch.hidden_size)}

    slices = []
    for name, info in tensors.items():
        base, role = split_quantized_name(name)
        parsed = parse_tensor_name(base)
        assert parsed is not None  # check_tensors rejected unknown names
        dims_of = template_dims(arch, parsed)
        assert dims_of is not None
        if parsed.layer is None:
            keeps = global_keep
            target = name
        else:
            if parsed.layer not in new_index:
                continue
            layer_keep = layer_keeps[parsed.layer]
            keeps = layer_keep.dims
            expert = None
            if parsed.expert is not None:
                assert layer_keep.experts is not None
                if parsed.expert not in layer_keep.experts:
                    continue
                expert = layer_keep.experts.index(parsed.expert)
            target = parsed.render(layer=new_index[parsed.layer], expert=expert)
        if role != "weight" or base != name:
            target = target[: -len("weight")] + name.rsplit(".", 1)[1]
        keep = tuple(keeps.get(dim) if dim is not Dim.FULL else None for dim in dims_of)
        keep, pad = _quantized_keep(name, role, info, keep, budget.name)
        shape = tuple(size if indices is None else len(indices) for size, indices in zip(info.shape, keep))
        slices.append(TensorSlice(name, target, info.dtype, info.shape, shape, keep, pad))

    new_config = rewrite_config(arch, config, budget, layer_map, widths)
    params, active = count_params(arch, slices, layer_map, budget)
    return SlicePlan(budget.name, new_config, tuple(slices), layer_map, params, active)


def _quantized_keep(
    name: str, role: str, info: TensorInfo, keep: tuple[Keep, ...], budget: str
) -> tuple[tuple[Keep, ...], float]:
    """Map a weight's keep indices onto its quantized tensors; return them and the pad value.

    Scalars are copied. Packed NVFP4 weights keep whole bytes and block scales whole blocks, so
    every input-axis cut must keep or drop whole blocks of 16 columns.
    """
    if len(info.shape) == 0:
        return (), 0.0
    packed = role == "weight" and info.dtype == PACKED_DTYPE
    if not packed and role != "scale":
        return keep, 0.0
    rows, columns = keep
    if columns is not None:
        blocks = _whole_blocks(columns)
        if blocks is None:
            raise MaskError(
                f"budget '{budget}' cuts the input of '{name}' inside a block of {NVFP4_BLOCK_SIZE} columns",
                "an NVFP4 parent can only be sliced where every cut keeps or drops whole blocks of 16",
            )
        if packed:
            half = NVFP4_BLOCK_SIZE // 2
            columns = tuple(b * half + i if b >= 0 else -1 for b in blocks for i in range(half))
        else:
            columns = blocks
    return (rows, columns), BLOCK_SCALE_PAD if role == "scale" else 0.0


def _whole_blocks(columns: tuple[int, ...]) -> tuple[int, ...] | None:
    """Return the block index of each kept block of 16 columns (-1 for padding), or None."""
    size = NVFP4_BLOCK_SIZE
    if len(columns) % size:
        return None
    blocks = []
    for start in range(0, len(columns), size):
        chunk = columns[start : start + size]
        if all(index < 0 for index in chunk):
            blocks.append(-1)
        elif chunk[0] % size == 0 and chunk == tuple(range(chunk[0], chunk[0] + size)):
            blocks.append(chunk[0] // size)
        else:
            return None
    return tuple(blocks)


def _common_widths(arch: NemotronHArch, budget: Budget, layer_map: tuple[int, ...]) -> dict[Dim, int]:
    """Return the FFN widths of the output: the maximum kept count over layers of each kind."""
    def widest(kind: LayerKind, axis: Axis, default: int) -> int:
        counts = [sum(budget.mask(axis, layer)) for layer in layer_map if arch.layer_kinds[layer] is kind]
        return max(counts) if counts else default

    return {
        Dim.FFN: widest(LayerKind.MLP, Axis.FFN_CHANNELS, arch.intermediate_size),
        Dim.EXPERT_FFN: widest(LayerKind.MOE, Axis.EXPERT_CHANNELS, arch.moe_intermediate_size),
        Dim.SHARED_FFN: widest(LayerKind.MOE, Axis.SHARED_EXPERT_CHANNELS, arch.shared_expert_intermediate_size),
    }


def check_tensors(arch: NemotronHArch, tensors: dict[str, TensorInfo]) -> None:
    """Check that the checkpoint's tensors are exactly a NemotronH layout for this config.

    Raises:
        CheckpointError: Naming the first unknown, missing or misshapen tensor.
    """
    for name, info in tensors.items():
        base, role = split_quantized_name(name)
        parsed = parse_tensor_name(base)
        expected = arch.template_shape(parsed) if parsed is not None else None
        if parsed is not None and parsed.expert is not None and parsed.expert >= arch.n_routed_experts:
            expected = None
        if expected is not None and (role != "weight" or info.dtype == PACKED_DTYPE):
            expected = quantized_shape(role, info.dtype, expected)
        if expected is None:
            raise CheckpointError(
                f"tensor '{name}' is not part of the NemotronH layout this config describes",
                "elastic slices only tensors it knows how to cut; remove it or check config.json",
            )
        if tuple(info.shape) != expected:
            raise CheckpointError(
                f"tensor '{name}' has shape {list(info.shape)} but config.json implies {list(expected)}",
                "the config and the weights disagree; check that config.json belongs to these shards",
            )
    missing = [name for name in arch.required_tensors() if name not in tensors]  # quantized weights keep their names
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} tensor(s) its config requires, e.g. '{missing[0]}'",
            "the checkpoint is incomplete; download it again",
        )


def rewrite_config(
    arch: NemotronHArch, config: dict[str, Any], budget: Budget, layer_map: tuple[int, ...], widths: dict[Dim, int]
) -> dict[str, Any]:
    """Return the child's ``config.json``: the parent's, with every width the budget changes."""
    out = copy.deepcopy(config)
    kinds = [arch.layer_kinds[layer] for layer in layer_map]

    if "hybrid_override_pattern" in out:
        out["hybrid_override_pattern"] = "".join(KIND_TO_CHAR[kind] for kind in kinds)
    for key in ("layers_block_type", "layer_types"):
        if key in out:
            out[key] = [KIND_TO_NATIVE[kind] for kind in kinds]
    if "num_hidden_layers" in out or arch.dialect == "pattern":
        out["num_hidden_layers"] = len(kinds)
    out["hidden_size"] = sum(budget.hidden)

    def first_of(kind: LayerKind) -> int | None:
        return next((layer for layer in layer_map if arch.layer_kinds[layer] is kind), None)

    def set_field(value: int, *keys: str) -> None:
        present = [key for key in keys if key in out]
        for key in present or keys[:1]:
            out[key] = value

    mamba = first_of(LayerKind.MAMBA)
    if mamba is not None:
        counts = group_counts(budget.mask(Axis.MAMBA_HEADS, mamba), arch.n_groups)
        set_field(sum(counts), "mamba_num_heads")
        set_field(sum(budget.mask(Axis.MAMBA_HEAD_CHANNELS, mamba)), "mamba_head_dim")
        set_field(sum(1 for count in counts if count), "n_groups", "mamba_n_groups")
    attention = first_of(LayerKind.ATTENTION)
    if attention is not None:
        set_field(sum(budget.mask(Axis.ATTENTION_HEADS, attention)), "num_attention_heads")
        out["num_key_value_heads"] = arch.num_key_value_heads
        out["head_dim"] = arch.head_dim  # explicit: loaders would otherwise derive hidden / heads
    if first_of(LayerKind.MLP) is not None:
        set_field(widths[Dim.FFN], "intermediate_size")
    moe = first_of(LayerKind.MOE)
    if moe is not None:
        set_field(sum(budget.mask(Axis.EXPERTS, moe)), "n_routed_experts", "num_local_experts")
        set_field(widths[Dim.EXPERT_FFN], "moe_intermediate_size")
        set_field(widths[Dim.SHARED_FFN], "moe_shared_expert_intermediate_size")
    return out


def count_params(
    arch: NemotronHArch, slices: list[TensorSlice] | tuple[TensorSlice, ...], layer_map: tuple[int, ...], budget: Budget
) -> tuple[int, int]:
    """Count stored and active parameters of a planned output.

    Active parameters are all parameters except routed experts, plus ``num_experts_per_tok``
    experts per MoE layer (embeddings and ``lm_head`` included). Quantized weights count as
    the weights they encode (two per packed NVFP4 byte); their scales do not count.
    """
    total = 0
    expert_params: dict[int, int] = {}
    for tensor in slices:
        _, role = split_quantized_name(tensor.source)
        if role != "weight":
            continue
        numel = math.prod(tensor.target_shape) * (2 if tensor.dtype == PACKED_DTYPE else 1)
        total += numel
        parsed = parse_tensor_name(tensor.source)
        if parsed is not None and parsed.expert is not None and parsed.layer is not None:
            expert_params[parsed.layer] = expert_params.get(parsed.layer, 0) + numel
    active = total
    for layer, params in expert_params.items():
        experts = sum(budget.mask(Axis.EXPERTS, layer))
        active -= params - params * min(arch.num_experts_per_tok, experts) // max(experts, 1)
    return total, active


def check_sliceable(problems: list, checkpoint: str) -> None:
    """Raise :class:`MaskError` listing validation problems, if any."""
    if problems:
        listing = "; ".join(str(problem) for problem in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MaskError(
            f"the budgets are not sliceable: {listing}{more}", f"run `elastic inspect {checkpoint}` to list every problem"
        )
