"""The nested forward: any budget's submodel run from the parent's parameters.

:class:`NestedNemotronH` contains one tensor per parent checkpoint tensor, named exactly as on
disk (``backbone.layers.3.mixer.in_proj.weight``), and runs the budget-``b`` child by cutting
those tensors with the budget's slice plan on every forward pass. The cuts are differentiable
(``index_select``, with a zero row appended where the plan pads), so the gradients of every
budget land in the same parent parameters, as nested training requires.

A student (``fake_quant=True``) keeps float32 master weights. Before the cut, each quantized
module's weight goes through :func:`~elastic_cli.qad.fake_quant.fake_quantize` with the fixed
PTQ scales, and every other tensor is rounded to its stored dtype, both with straight-through
gradients. Budgets cut NVFP4 inputs only at multiples of 16, and fake quantization uses a global
scale shared by all budgets. So quantizing before the cut equals quantizing the sliced weight, and
the student's budget-``b`` forward equals the forward of the budget-``b`` child sliced from the
exported checkpoint. A teacher keeps the stored tensors as frozen parameters and cuts them as they
are. Inside :func:`fake_quantized` a teacher runs as its post-training-quantized model instead,
which the evaluation uses to score the PTQ starting points without a second copy of the weights.

The layers run as transformers' own ``NemotronHBlock`` modules of each child config. They are
built once per budget on the meta device and called with :func:`torch.func.functional_call`, so
the numerics are those of ``NemotronHForCausalLM`` loading the sliced child (eager experts loop,
SDPA attention, no cache). Each parent layer is its own submodule (``backbone.layers.{i}``) whose
``forward`` runs that layer for the requested budget, and FSDP2 shards it as one unit.

Name mapping from disk to transformers' child block (the same as calibration uses):
``backbone.layers.{i}.norm.weight`` to ``norm.weight``, ``backbone.layers.{i}.mixer.X`` to
``mixer.X``, and routed experts ``mixer.experts.{e}.up_proj.weight`` ``[I, H]`` stacked in child
expert order into ``mixer.experts.up_proj`` ``[E, I, H]`` (``down_proj`` likewise, ``[E, H, I]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from elastic_cli.arch.nemotron_h import parse_tensor_name
from elastic_cli.checkpoint.safetensors_io import TensorInfo
from elastic_cli.checkpoint.torch_dtypes import TORCH_DTYPES
from elastic_cli.elastic.plan import Keep, SlicePlan
from elastic_cli.errors import ElasticError, UnsupportedError
from elastic_cli.formats.errors import FormatError
from elastic_cli.qad.fake_quant import fake_quantize, round_to_stored, weight_scale
from elastic_cli.quantize.export import ModuleScales

if TYPE_CHECKING:
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

EMBEDDINGS = "backbone.embeddings.weight"
FINAL_NORM = "backbone.norm_f.weight"
LM_HEAD = "lm_head.weight"
# Tensors that transformers registers as buffers: loaded and cut like the others, never trained.
BUFFER_SUFFIXES = ("gate.e_score_correction_bias",)
# The cut of one tensor: (dimension, index tensor, whether the index points padding at an appended zero slice).
Dims = tuple[tuple[int, torch.Tensor, bool], ...]


@dataclass(frozen=True)
class _Cut:
    """One child tensor: which holder tensor it comes from and how each dimension is cut.

    ``dims`` lists ``(dim, index, padded)``. A padded index points padding entries at a zero
    slice appended to that dimension. ``expert`` is the child expert slot of a routed expert's
    weight, which is stacked into ``key``; otherwise ``None``.
    """

    source: str
    key: str
    dims: Dims
    expert: int | None = None


@dataclass
class _LayerRun:
    """One budget's run of one parent layer: the child block (meta) and the cuts that feed it."""

    block: nn.Module
    cuts: list[_Cut]


@dataclass
class _BudgetView:
    """Per-budget data the root module needs: the child config and the global cuts."""

    name: str
    config: NemotronHConfig
    head: nn.Module
    cuts: dict[str, _Cut] = field(default_factory=dict)

    @property
    def embedding_dims(self) -> Dims:
        """The hidden-channel cut of looked-up embedding rows: the weight's dimension 1, now the last."""
        return tuple((-1, index, padded) for dim, index, padded in self.cuts[EMBEDDINGS].dims if dim == 1)


class _IndexCache:
    """Converts keep tuples to index tensors on the compute device once; budgets share many of them."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, bool]] = {}

    def index(self, keep: tuple[int, ...], size: int) -> tuple[torch.Tensor, bool]:
        key = (id(keep), size)
        cached = self._cache.get(key)
        if cached is None:
            index = torch.tensor(keep, dtype=torch.long)
            padded = bool((index < 0).any())
            if padded:
                index = torch.where(index < 0, torch.full_like(index, size), index)  # the appended zero slice
            cached = (index.to(self.device), padded)
            self._cache[key] = cached
        return cached


def _dims(keep: tuple[Keep, ...], shape: tuple[int, ...], cache: _IndexCache) -> Dims:
    dims = []
    for dim, indices in enumerate(keep):
        if indices is None:
            continue
        index, padded = cache.index(indices, shape[dim])
        dims.append((dim, index, padded))
    return tuple(dims)


def cut(tensor: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Keep the indexed entries of each dimension, differentiably; padded entries become zero."""
    for dim, index, padded in dims:
        if padded:
            shape = list(tensor.shape)
            shape[dim] = 1
            tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
        tensor = tensor.index_select(dim, index)
    return tensor


def child_config(plan: SlicePlan) -> NemotronHConfig:
    """Build transformers' config of a budget's child for a cache-free forward with gradients.

    SDPA attention and the eager experts loop are what the golden tests load. The default
    grouped_mm experts path rejects rows that are not a multiple of 16 bytes on CPU
    (torch 2.13.0, transformers 5.25.0).
    """
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

    config = NemotronHConfig.from_dict(dict(plan.config))
    config.use_cache = False
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    return config


class _Node(nn.Module):
    """A plain container, so that parameter names follow the on-disk names."""


class _Head(nn.Module):
    """The final RMSNorm and ``lm_head`` of one child, built on the meta device."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm

        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(hidden)).float()


class _Weights:
    """The conversion of a holder's stored tensors into the values a child block receives.

    Students fake-quantize quantized modules (before the cut) and round the rest to their stored
    dtype. Teachers pass the stored tensors through. Either way the cut result is cast to the
    compute dtype, except tensors the checkpoint stores in float32, which stay float32.
    """

    def __init__(
        self,
        fake_quant: bool,
        compute_dtype: torch.dtype,
        stored: dict[str, torch.dtype],
        quantized: dict[str, tuple[str, ModuleScales]],
    ) -> None:
        self.fake_quant = fake_quant
        self.compute_dtype = compute_dtype
        self.stored = stored  # holder-local tensor name -> stored dtype
        self.quantized = quantized  # holder-local weight name -> (format, scales)
        # Computed once on the CPU, then moved to the compute device on first use.
        self._scales = {name: weight_scale(scales) for name, (_, scales) in quantized.items()}

    def prepare(self, name: str, tensor: torch.Tensor, dims: Dims) -> torch.Tensor:
        stored = self.stored[name]
        # Tensors a checkpoint keeps in float32 (A_log, D, routers) stay float32 in a BF16 forward.
        dtype = torch.float32 if stored == torch.float32 else self.compute_dtype
        if self.fake_quant and name in self.quantized:
            fmt = self.quantized[name][0]
            scale = self._scales[name]
            if scale.device != tensor.device:
                scale = scale.to(tensor.device)
                self._scales[name] = scale
            # A float32 input makes a BF16 teacher under fake_quantized dequantize to float32, as the student does.
            return cut(fake_quantize(tensor.float(), fmt, scale, stored), dims).to(dtype)
        value = cut(tensor, dims)
        if self.fake_quant:
            value = round_to_stored(value, stored)  # elementwise, so it commutes with the cut
        return value.to(dtype)


class NestedLayer(nn.Module):
    """One parent layer's tensors, and its forward for any budget that keeps it."""

    def __init__(self, parent_layer: int) -> None:
        super().__init__()
        self.parent_layer = parent_layer
        # Plain lists, not submodules: the meta child blocks must stay out of state dicts and FSDP.
        self.runs: list[_LayerRun | None] = []
        self.weights: _Weights | None = None
        self.checkpoint_activations = False

    def forward(
        self, hidden: torch.Tensor, budget: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run this layer for a budget: ``hidden`` [batch, seq, child hidden] in and out."""
        run = self.runs[budget]
        if run is None:  # the budget drops this layer, so the residual passes through
            return hidden
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Recomputes the cuts, the fake quantization and the block during the backward pass.
            return checkpoint(self._run, run, hidden, attention_mask, position_ids, use_reentrant=False)
        return self._run(run, hidden, attention_mask, position_ids)

    def _run(
        self, run: _LayerRun, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        assert self.weights is not None
        tensors = dict(self.named_parameters())
        tensors.update(self.named_buffers())

        values: dict[str, torch.Tensor] = {}
        experts: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for cut_ in run.cuts:
            value = self.weights.prepare(cut_.source, tensors[cut_.source], cut_.dims)
            if cut_.expert is None:
                values[cut_.key] = value
            else:
                experts.setdefault(cut_.key, []).append((cut_.expert, value))
        for key, items in experts.items():
            values[key] = torch.stack([value for _, value in sorted(items, key=lambda item: item[0])])

        mask = attention_mask if run.block.block_type == "full_attention" else None
        kwargs = {"attention_mask": mask, "position_ids": position_ids, "use_cache": False}
        return functional_call(run.block, values, (hidden,), kwargs, strict=True)


class NestedNemotronH(nn.Module):
    """A parent NemotronH whose forward runs any of its nested budgets.

    Parameter and buffer names are the checkpoint's tensor names. Build it with
    :func:`build_nested` on the meta device, optionally shard it, then load it with
    ``elastic_cli.qad.distributed.materialize``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.views: list[_BudgetView] = []
        self.weights: _Weights | None = None
        self.tie_word_embeddings = False

    @property
    def layers(self) -> list[NestedLayer]:
        return list(self.backbone.layers.children())  # type: ignore[union-attr]

    @property
    def budget_names(self) -> list[str]:
        return [view.name for view in self.views]

    def forward(self, input_ids: torch.Tensor, budget: int) -> torch.Tensor:
        """Return the budget's logits, float32 ``[batch, seq, vocab]``, for ``input_ids`` ``[batch, seq]``."""
        from transformers.masking_utils import create_causal_mask

        assert self.weights is not None
        view = self.views[budget]
        embeddings = self.get_parameter(EMBEDDINGS)
        rows = nn.functional.embedding(input_ids, embeddings)  # [batch, seq, H]: look up rows, then cut columns
        hidden = self.weights.prepare(EMBEDDINGS, rows, view.embedding_dims)

        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = create_causal_mask(
            config=view.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
        )
        for layer in self.layers:
            hidden = layer(hidden, budget, mask, positions)

        head = EMBEDDINGS if self.tie_word_embeddings else LM_HEAD
        values = {
            "norm_f.weight": self.weights.prepare(
                FINAL_NORM, self.get_parameter(FINAL_NORM), view.cuts[FINAL_NORM].dims
            ),
            "lm_head.weight": self.weights.prepare(head, self.get_parameter(head), view.cuts[head].dims),
        }
        return functional_call(view.head, values, (hidden,), strict=True)


def build_nested(
    tensors: dict[str, TensorInfo],
    plans: list[SlicePlan],
    *,
    fake_quant: bool,
    quantized: dict[str, ModuleScales] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> NestedNemotronH:
    """Build the nested model on the meta device, from headers and slice plans alone.

    Args:
        tensors: The parent checkpoint's tensors (names, dtypes and shapes).
        plans: One slice plan per budget, largest first; budget ``b`` of :meth:`NestedNemotronH.forward`
            is ``plans[b]``.
        fake_quant: Build a student (float32 master parameters, fake-quantized forward) rather
            than a frozen teacher (parameters in their stored dtypes, no gradients).
        quantized: Module name (``backbone.layers.3.mixer.in_proj``) to its scales, for every
            quantized module; every weight amax must be positive. Ignored for a teacher.
        compute_dtype: The dtype of the cut weights and of the activations.
        device: The compute device, where the index tensors of the cuts are created.

    Raises:
        UnsupportedError: For a tensor transformers' NemotronH modules have no place for.
        ElasticError: For a weight amax the module's format cannot represent.
    """
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock

    model = NestedNemotronH()
    parsed_names = [parse_tensor_name(name) for name in tensors]
    layer_count = 1 + max((p.layer for p in parsed_names if p is not None and p.layer is not None), default=-1)
    layers = [NestedLayer(index) for index in range(layer_count)]
    _build_tree(model, tensors, layers, fake_quant)
    model.tie_word_embeddings = LM_HEAD not in tensors

    stored = {name: TORCH_DTYPES[info.dtype] for name, info in tensors.items()}
    modules = _quantized_weights(quantized or {}) if fake_quant else {}
    _install_weights(model, layers, _Weights(fake_quant, compute_dtype, stored, modules))

    cache = _IndexCache(device)
    for plan in plans:
        config = child_config(plan)
        with torch.device("meta"):
            head = _Head(config)
        view = _BudgetView(plan.budget, config, head)
        by_layer: dict[int, list[_Cut]] = {}
        for tensor in plan.tensors:
            parsed = parse_tensor_name(tensor.source)
            if parsed is None:
                continue
            dims = _dims(tensor.keep, tensor.source_shape, cache)
            if parsed.layer is None:
                view.cuts[tensor.source] = _Cut(tensor.source, tensor.target, dims)
                continue
            by_layer.setdefault(parsed.layer, []).append(_layer_cut(tensor.source, tensor.target, parsed.layer, dims))
        if model.tie_word_embeddings:
            view.cuts[LM_HEAD] = view.cuts[EMBEDDINGS]
        child_index = {parent: child for child, parent in enumerate(plan.layer_map)}
        for layer in layers:
            child = child_index.get(layer.parent_layer)
            if child is None:
                layer.runs.append(None)
                continue
            with torch.device("meta"):
                block = NemotronHBlock(config, layer_idx=child).eval()
            layer.runs.append(_LayerRun(block, by_layer.get(layer.parent_layer, [])))
        model.views.append(view)
    return model


def _quantized_weights(quantized: dict[str, ModuleScales]) -> dict[str, tuple[str, ModuleScales]]:
    """Map each quantized module's weight name to its format and scales, checking every weight scale."""
    modules = {f"{module}.weight": (scales.format, scales) for module, scales in quantized.items()}
    for name, (_, scales) in modules.items():
        try:
            weight_scale(scales)
        except (FormatError, ValueError) as error:
            raise ElasticError(
                f"cannot fake-quantize '{name}' with weight amax {scales.weight_amax}: {error}",
                "keep this module in BF16 with --exclude",
            ) from error
    return modules


def _install_weights(model: NestedNemotronH, layers: list[NestedLayer], weights: _Weights) -> None:
    """Give the root and every layer its conversion. A layer's tensor names are local to the layer."""
    model.weights = weights
    for layer in layers:
        prefix = f"backbone.layers.{layer.parent_layer}."
        local_stored = {name[len(prefix) :]: dtype for name, dtype in weights.stored.items() if name.startswith(prefix)}
        local_quantized = {
            name[len(prefix) :]: value for name, value in weights.quantized.items() if name.startswith(prefix)
        }
        layer.weights = _Weights(weights.fake_quant, weights.compute_dtype, local_stored, local_quantized)


@contextlib.contextmanager
def fake_quantized(model: NestedNemotronH, quantized: dict[str, ModuleScales]) -> Iterator[NestedNemotronH]:
    """Run a teacher as its post-training-quantized model inside the block, without copying a weight.

    Inside the block the forward fake-quantizes every module of ``quantized`` from the stored
    weights with those scales. It then equals the forward of a student whose master weights are
    the stored weights (weights only: activations are not quantized). The teacher's own
    conversion is restored when the block exits.

    Raises:
        ElasticError: For a weight amax the module's format cannot represent.
    """
    assert model.weights is not None
    saved = (model.weights, [layer.weights for layer in model.layers])
    current = model.weights
    modules = _quantized_weights(quantized)
    _install_weights(model, model.layers, _Weights(True, current.compute_dtype, current.stored, modules))
    try:
        yield model
    finally:
        model.weights = saved[0]
        for layer, weights in zip(model.layers, saved[1]):
            layer.weights = weights


def _layer_cut(source: str, target: str, parent_layer: int, dims: Dims) -> _Cut:
    """Map a layer tensor to its key in transformers' ``NemotronHBlock`` (see the module docstring)."""
    local = source[len(f"backbone.layers.{parent_layer}.") :]
    parsed = parse_tensor_name(target)
    assert parsed is not None and parsed.layer is not None  # plans contain only NemotronH names
    if parsed.expert is None:
        key = f"mixer.{parsed.template}" if parsed.is_mixer else parsed.template
        return _Cut(local, key, dims)
    projection = parsed.template.removeprefix("experts.{e}.")
    if projection not in ("up_proj.weight", "down_proj.weight"):
        raise UnsupportedError(
            f"tensor '{source}' has no place in transformers' fused NemotronH experts",
            "QAD runs transformers' modules, which have no routed-expert biases",
        )
    return _Cut(local, f"mixer.experts.{projection.removesuffix('.weight')}", dims, parsed.expert)


def _build_tree(
    model: NestedNemotronH, tensors: dict[str, TensorInfo], layers: list[NestedLayer], fake_quant: bool
) -> None:
    """Create one meta parameter (or buffer) per checkpoint tensor, at its on-disk name."""
    backbone = _Node()
    model.add_module("backbone", backbone)
    layer_list = nn.ModuleList(layers)
    backbone.add_module("layers", layer_list)
    for name, info in tensors.items():
        parts = name.split(".")
        node: nn.Module = model
        for part in parts[:-1]:
            child = node._modules.get(part)
            if child is None:
                child = _Node()
                node.add_module(part, child)
            node = child
        dtype = torch.float32 if fake_quant else TORCH_DTYPES[info.dtype]
        value = torch.empty(info.shape, dtype=dtype, device="meta")
        if name.endswith(BUFFER_SUFFIXES):
            node.register_buffer(parts[-1], value)
        else:
            node.register_parameter(parts[-1], nn.Parameter(value, requires_grad=fake_quant))
