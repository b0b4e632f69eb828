"""Activation calibration: the max |input| of every Linear module, over every budget.

Calibration runs real forward passes with transformers' own NemotronH modules
(``NemotronHBlock`` from ``transformers.models.nemotron_h``) in float32, one parent layer at a
time. A layer's tensors other than routed experts are read once. Each budget that keeps the
layer cuts them with its slice plan, loads them into one block of its child config and runs that
block on its own hidden states. A sliced child equals the masked parent, so each budget's activations are
those of its nested submodel.

Observers record the max |input| of every Linear (and, for the FP8 KV cache, the max |output| of
``k_proj`` and ``v_proj``) under parent module and expert names. The stored amax is the maximum
over budgets and tokens, so one scale serves every budget sliced from the quantized parent.

Routed experts are never all in memory. In each MoE block, ``_CheckpointExperts`` replaces
transformers' fused ``NemotronHExperts`` and reads each expert the router selects from the
checkpoint when it runs (once per budget and micro-batch), so a layer needs the same memory
whatever its number of experts.

Memory: one parent layer's tensors other than routed experts, plus one budget's float32 copy of
them, plus one routed expert's ``up_proj`` and ``down_proj`` (as stored and in float32), plus the
hidden states of every budget (``samples * seq_len * hidden * 4`` bytes each, kept on the CPU),
plus the activations of one micro-batch. Of the embedding, only the rows of the calibration
tokens are read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from elastic_cli.arch.nemotron_h import LayerKind, NemotronHArch, parse_tensor_name
from elastic_cli.elastic.masks import Axis, Budget, parse_budget_spec
from elastic_cli.elastic.plan import SlicePlan, TensorSlice, build_plan, check_sliceable, kept
from elastic_cli.elastic.tensor_cut import TensorCutter
from elastic_cli.elastic.source import ElasticSource
from elastic_cli.errors import CheckpointError, UnsupportedError, UsageError

if TYPE_CHECKING:
    from elastic_cli.checkpoint.reader import Checkpoint
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

log = logging.getLogger(__name__)

DEFAULT_MICRO_BATCH = 8  # calibration sequences per forward pass
FULL_BUDGET = "full"
EMBEDDINGS = "backbone.embeddings.weight"
FINAL_NORM = "backbone.norm_f.weight"
LM_HEAD = "lm_head"
# Linear modules (names under ``backbone.layers.{i}.mixer.``) per layer kind; ``{e}`` is the expert.
LINEAR_MODULES: dict[LayerKind, tuple[str, ...]] = {
    LayerKind.MAMBA: ("in_proj", "out_proj"),
    LayerKind.ATTENTION: ("q_proj", "k_proj", "v_proj", "o_proj"),
    LayerKind.MLP: ("up_proj", "down_proj"),
    LayerKind.MOE: (
        "experts.{e}.up_proj",
        "experts.{e}.down_proj",
        "shared_experts.up_proj",
        "shared_experts.down_proj",
    ),
}
# Last resort for an unreached expert when no observation in the model can stand in (see calibrate()).
FALLBACK_AMAX = 1.0

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CalibrationResult:
    """Calibrated activation ranges of a checkpoint, over every calibrated budget.

    Attributes:
        input_amax: Parent module name (``backbone.layers.3.mixer.in_proj``,
            ``backbone.layers.1.mixer.experts.7.up_proj``, ``lm_head``) to the max |input| over
            all budgets and tokens, for every requested module.
        kv_amax: Attention mixer prefix (``backbone.layers.5.mixer``) to the max |output| of
            ``k_proj`` and of ``v_proj`` over all budgets; empty unless the KV cache was calibrated.
        unreached_experts: Parent layer to the parent expert ids that no calibration token
            reached in any budget; their amax comes from the rule described in :func:`calibrate`.
        samples: Calibration sequences.
        tokens: Calibration tokens per budget (``samples * seq_len``).
        budgets: Names of the calibrated budgets, largest first.
    """

    input_amax: dict[str, float]
    kv_amax: dict[str, tuple[float, float]]
    unreached_experts: dict[int, list[int]]
    samples: int
    tokens: int
    budgets: tuple[str, ...]


def calibratable_modules(arch: NemotronHArch) -> set[str]:
    """List the parent name of every Linear module whose input :func:`calibrate` can observe."""
    names = {LM_HEAD}
    for layer, kind in enumerate(arch.layer_kinds):
        for template in LINEAR_MODULES[kind]:
            experts = range(arch.n_routed_experts) if "{e}" in template else [None]
            for expert in experts:
                suffix = template if expert is None else template.replace("{e}", str(expert))
                names.add(f"backbone.layers.{layer}.mixer.{suffix}")
    return names


def full_budget(arch: NemotronHArch) -> Budget:
    """Return a budget that keeps every component: the parent model itself."""
    return parse_budget_spec({"budgets": [{"name": FULL_BUDGET, "keep": {}}]}, arch, "calibration")[0]


def calibrate(
    source: ElasticSource,
    modules: set[str],
    token_ids: torch.Tensor,
    budgets: list[Budget] | None = None,
    kv_cache: bool = False,
    progress: Progress | None = None,
    *,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    device: str | torch.device = "cpu",
) -> CalibrationResult:
    """Measure the max |input| of Linear modules over every budget, one layer at a time.

    Routed experts that no calibration token reached in any budget get a finite amax by this
    rule, applied per projection and layer:

    1. the max amax of the reached experts of the same projection in the same layer;
    2. if no expert of the layer was reached, ``up_proj`` takes the amax of the layer's
       ``shared_experts.up_proj`` (it reads the same normalised hidden states, from every
       token), and ``down_proj`` the max ``down_proj`` amax of all reached experts in the model;
    3. if still nothing was observed, ``1.0``.

    Args:
        source: The opened parent checkpoint.
        modules: Parent module names to report (see :func:`calibratable_modules`).
        token_ids: Calibration token ids, ``[samples, seq_len]``, int64.
        budgets: Budgets to run, largest first; ``None`` runs only the full parent (a checkpoint
            without masks).
        kv_cache: Also record the max |output| of ``k_proj`` and ``v_proj``.
        progress: Called after each parent layer with ``(layers done, total layers)``.
        micro_batch: Calibration sequences per forward pass.
        device: Where the forward passes run; hidden states between layers stay on the CPU.
            NOTE: only ``"cpu"`` is covered by the tests.

    Returns:
        The amax values, keyed by parent names.

    Raises:
        UsageError: If ``token_ids`` is not a non-empty ``[samples, seq_len]`` int64 tensor, or
            an id lies outside the model's vocabulary.
        ValueError: If a module name is not a Linear module of this architecture, ``budgets``
            is an empty list or ``micro_batch`` is below 1.
        UnsupportedError: If a requested module lies in a layer no calibrated budget keeps, or
            the checkpoint has tensors transformers' NemotronH modules cannot hold.
        CheckpointError: If an activation is not finite.
        MaskError: If the budgets cannot be sliced.
    """
    started = time.monotonic()
    arch = source.arch
    _check_token_ids(token_ids, arch.vocab_size)
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
    if budgets is None:
        budgets = [full_budget(arch)]
    elif not budgets:
        raise ValueError("budgets is empty; pass None to calibrate the full model")
    else:
        check_sliceable(source.problems, source.inspect_target)
    unknown = sorted(modules - calibratable_modules(arch))
    if unknown:
        raise ValueError(
            f"{len(unknown)} module name(s) are not Linear modules of this checkpoint, e.g. {unknown[0]!r}"
        )

    checkpoint = source.checkpoint
    plans = [build_plan(arch, checkpoint.config, checkpoint.tensors, budget) for budget in budgets]
    runs = [_BudgetRun.create(arch, budget, plan) for budget, plan in zip(budgets, plans)]
    _check_kept(arch, modules, runs)
    samples, seq_len = token_ids.shape
    log.info(
        "calibrating %d module(s) on %d sample(s) x %d tokens for budget(s) %s",
        len(modules), samples, seq_len, ", ".join(run.budget.name for run in runs),
    )

    stats = _Observations()
    cutter = TensorCutter()
    layer_tensors = _names_by_layer(checkpoint.tensors)
    # CPU matmuls round differently with different thread counts, which would change the amax
    # values and so the exported bytes; one thread makes calibration independent of
    # OMP_NUM_THREADS on a given machine.
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            _embed(source, runs, token_ids, cutter)
            for layer in range(arch.num_layers):
                _run_layer(source, layer, layer_tensors.get(layer, []), runs, stats, cutter, kv_cache, micro_batch, device)
                if progress is not None:
                    progress(layer + 1, arch.num_layers)
            if LM_HEAD in modules:
                _observe_lm_head(source, runs, stats, cutter)
    finally:
        torch.set_num_threads(threads)

    filled, unreached = fill_unreached_experts(arch, stats.input_amax, stats.reached, [run.layer_keep for run in runs])
    input_amax = {name: filled[name] for name in sorted(modules)}
    kv_amax = dict(sorted(stats.kv_amax.items())) if kv_cache else {}
    _check_finite(input_amax, kv_amax)
    elapsed = time.monotonic() - started
    log.info(
        "calibrated %d module(s) over %d budget(s) in %.1f s; %d routed expert(s) unreached",
        len(modules), len(runs), elapsed, sum(len(experts) for experts in unreached.values()),
    )
    return CalibrationResult(
        input_amax=input_amax,
        kv_amax=kv_amax,
        unreached_experts=unreached,
        samples=samples,
        tokens=samples * seq_len,
        budgets=tuple(run.budget.name for run in runs),
    )


def _check_token_ids(token_ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype != torch.int64 or token_ids.dim() != 2:
        shape = list(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        dtype = token_ids.dtype if isinstance(token_ids, torch.Tensor) else None
        raise UsageError(
            f"calibration token ids must be an int64 tensor of shape [samples, seq_len], got {dtype} {shape}",
            "tokenize the calibration text with elastic_cli.quantize.calib_data.tokenize",
        )
    if token_ids.numel() == 0:
        raise UsageError("calibration token ids are empty", "pass at least one sample of at least one token")
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or high >= vocab_size:
        invalid = high if high >= vocab_size else low
        raise UsageError(
            f"calibration token id {invalid} is outside the model's vocabulary of {vocab_size}",
            "tokenize the calibration text with the checkpoint's own tokenizer",
        )


@dataclass
class _Observations:
    """Running maxima, keyed by parent names."""

    input_amax: dict[str, float] = field(default_factory=dict)
    kv_amax: dict[str, tuple[float, float]] = field(default_factory=dict)
    reached: dict[int, set[int]] = field(default_factory=dict)  # parent layer -> parent expert ids

    def record(self, name: str, amax: float) -> None:
        old = self.input_amax.get(name)
        self.input_amax[name] = amax if old is None else _max(old, amax)

    def record_kv(self, prefix: str, index: int, amax: float) -> None:
        values = list(self.kv_amax.get(prefix, (0.0, 0.0)))
        values[index] = _max(values[index], amax)
        self.kv_amax[prefix] = (values[0], values[1])


def _max(a: float, b: float) -> float:
    """Return the larger value, letting NaN win so that it is reported, not hidden."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def _amax(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().amax().float()) if tensor.numel() else 0.0


@dataclass
class _BudgetRun:
    """One budget's state while calibrating: its plan, child config and current hidden states."""

    budget: Budget
    plan: SlicePlan
    config: NemotronHConfig  # transformers' config of the child
    child_layer: dict[int, int]  # parent layer -> child layer
    layer_slices: dict[int, list[TensorSlice]]  # parent layer -> the plan's tensors of that layer
    layer_keep: dict[int, tuple[int, ...]]  # parent MoE layer -> kept parent expert ids
    hidden: torch.Tensor | None = None  # [samples, seq_len, child hidden], float32, CPU

    @classmethod
    def create(cls, arch: NemotronHArch, budget: Budget, plan: SlicePlan) -> "_BudgetRun":
        layer_slices: dict[int, list[TensorSlice]] = {}
        for tensor in plan.tensors:
            parsed = parse_tensor_name(tensor.source)
            if parsed is not None and parsed.layer is not None:
                layer_slices.setdefault(parsed.layer, []).append(tensor)
        layer_keep = {
            layer: kept(budget.mask(Axis.EXPERTS, layer))
            for layer in plan.layer_map
            if arch.layer_kinds[layer] is LayerKind.MOE
        }
        child_layer = {parent: child for child, parent in enumerate(plan.layer_map)}
        return cls(budget, plan, _child_config(plan), child_layer, layer_slices, layer_keep)

    def global_slice(self, name: str) -> TensorSlice:
        return next(tensor for tensor in self.plan.tensors if tensor.source == name)


def _child_config(plan: SlicePlan) -> NemotronHConfig:
    """Build transformers' config of a budget's child, set up for a plain CPU-safe forward."""
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

    config = NemotronHConfig.from_dict(dict(plan.config))
    config.use_cache = False
    # SDPA keeps attention memory linear in the sequence length. The eager experts loop works for
    # any width, but the default grouped_mm path raises "strides should be multiple of 16 bytes"
    # on CPU when an expert row is not a multiple of 16 bytes, such as 37 float32 values
    # (torch 2.13.0, transformers 5.25.0).
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    return config


def _check_kept(arch: NemotronHArch, modules: set[str], runs: list[_BudgetRun]) -> None:
    """Reject requested modules of layers that no calibrated budget runs."""
    run_layers = {layer for run in runs for layer in run.plan.layer_map}
    for name in sorted(modules):
        parsed = parse_tensor_name(f"{name}.weight")
        if parsed is None or parsed.layer is None or parsed.layer in run_layers:
            continue
        raise UnsupportedError(
            f"module {name} lies in layer {parsed.layer}, which no calibrated budget keeps, "
            "so no activation reaches it",
            "keep that layer's modules in high precision with --exclude",
        )


def _names_by_layer(tensors: dict) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for name in tensors:
        parsed = parse_tensor_name(name)
        if parsed is not None and parsed.layer is not None:
            by_layer.setdefault(parsed.layer, []).append(name)
    return by_layer


def _embed(source: ElasticSource, runs: list[_BudgetRun], token_ids: torch.Tensor, cutter: TensorCutter) -> None:
    """Look up every budget's input embeddings: rows of the token ids, kept hidden channels."""
    log.info("embedding %d token(s) for %d budget(s)", token_ids.numel(), len(runs))
    ids, positions = torch.unique(token_ids.reshape(-1), sorted=True, return_inverse=True)
    rows = source.checkpoint.read_rows(EMBEDDINGS, tuple(ids.tolist()))[positions]  # [tokens, H]
    for run in runs:
        hidden = cutter.cut(rows, run.global_slice(EMBEDDINGS).keep).float()  # [tokens, child H]
        run.hidden = hidden.reshape(*token_ids.shape, -1)


def _run_layer(
    source: ElasticSource,
    layer: int,
    names: list[str],
    runs: list[_BudgetRun],
    stats: _Observations,
    cutter: TensorCutter,
    kv_cache: bool,
    micro_batch: int,
    device: str | torch.device,
) -> None:
    """Read one parent layer once and run it for every budget that keeps it.

    Routed experts are not read here: each budget's block reads the experts its router selects
    while it runs (see :class:`_CheckpointExperts`).
    """
    active = [run for run in runs if layer in run.child_layer]
    if not active:
        log.debug("layer %d: no calibrated budget keeps it", layer)
        return
    parent = {name: source.checkpoint.read(name) for name in names if not _is_routed_expert(name)}
    for run in active:
        child = run.child_layer[layer]
        state, experts = _block_state(run.layer_slices[layer], parent, cutter)
        block = _load_block(run.config, child, state, experts, layer, source.checkpoint, cutter)
        del state
        block.to(device)
        with _observe(block, layer, run.layer_keep.get(layer), stats, kv_cache):
            _forward(block, run, micro_batch, device)
        del block
    log.debug("layer %d (%s): ran %d budget(s)", layer, source.arch.layer_kinds[layer].value, len(active))


def _is_routed_expert(name: str) -> bool:
    parsed = parse_tensor_name(name)
    return parsed is not None and parsed.expert is not None


def _block_state(
    slices: list[TensorSlice], parent: dict[str, torch.Tensor], cutter: TensorCutter
) -> tuple[dict[str, torch.Tensor], dict[str, list[TensorSlice]]]:
    """Cut one layer's tensors other than routed experts for a budget, in float32.

    Returns:
        The cut tensors, named as ``NemotronHBlock`` parameters, and the routed experts' slices
        per projection (``up_proj``, ``down_proj``), in child expert order, for
        :class:`_CheckpointExperts` to read when it runs.

    Raises:
        UnsupportedError: If the layer has routed-expert tensors other than the two weights.
    """
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, TensorSlice]] = {}
    for tensor in slices:
        parsed = parse_tensor_name(tensor.target)
        assert parsed is not None and parsed.layer is not None  # plans contain only NemotronH names
        if parsed.expert is None:
            key = f"mixer.{parsed.template}" if parsed.is_mixer else parsed.template
            state[key] = cutter.cut(parent[tensor.source], tensor.keep).float()
            continue
        projection = parsed.template.removeprefix("experts.{e}.")
        if projection not in ("up_proj.weight", "down_proj.weight"):
            raise UnsupportedError(
                f"tensor '{tensor.source}' has no place in transformers' fused NemotronH experts",
                "calibration runs transformers' modules, which have no routed-expert biases",
            )
        experts.setdefault(projection.removesuffix(".weight"), {})[parsed.expert] = tensor
    ordered = {projection: [by_expert[e] for e in sorted(by_expert)] for projection, by_expert in experts.items()}
    return state, ordered


def _load_block(
    config: NemotronHConfig,
    child_layer: int,
    state: dict[str, torch.Tensor],
    experts: dict[str, list[TensorSlice]],
    parent_layer: int,
    checkpoint: Checkpoint,
    cutter: TensorCutter,
) -> nn.Module:
    """Build one ``NemotronHBlock`` of the child config that uses the tensors of ``state``, without random init.

    In an MoE block, a :class:`_CheckpointExperts` over ``experts`` replaces transformers'
    fused experts.
    """
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock

    with torch.device("meta"):
        block = NemotronHBlock(config, layer_idx=child_layer)
    if block.block_type == "moe":
        problem = _experts_problem(block.mixer.experts, experts)
        if problem is None:
            block.mixer.experts = _CheckpointExperts(block.mixer.experts, experts, checkpoint, cutter)
    elif experts:
        problem = f"the checkpoint has 'mixer.experts.{min(experts)}', which transformers' NemotronH block lacks"
    else:
        problem = None
    if problem is None:
        result = block.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys:
            problem = f"transformers' NemotronH block expects {result.missing_keys[0]!r}, which the checkpoint lacks"
        elif result.unexpected_keys:
            problem = f"the checkpoint has {result.unexpected_keys[0]!r}, which transformers' NemotronH block lacks"
        else:
            return block.eval()
    raise UnsupportedError(
        f"layer {parent_layer}: {problem}",
        "calibration runs transformers' NemotronH modules; check config.json against the weights",
    )


def _experts_problem(fused: nn.Module, experts: dict[str, list[TensorSlice]]) -> str | None:
    """Describe how a budget's routed-expert tensors fail to fit transformers' fused experts, if they do."""
    for projection in ("up_proj", "down_proj"):
        key = f"mixer.experts.{projection}"
        slices = experts.get(projection, [])
        expected = tuple(getattr(fused, projection).shape)  # [E, out, in]
        if not slices:
            return f"transformers' NemotronH block expects {key!r}, which the checkpoint lacks"
        if len(slices) != expected[0]:
            return f"{key} has {len(slices)} routed experts in the checkpoint, but the config has {expected[0]}"
        for tensor in slices:
            if tuple(tensor.target_shape) != expected[1:]:
                return f"{tensor.source} cuts to {list(tensor.target_shape)}, but {key} expects {list(expected[1:])}"
    return None


class _CheckpointExperts(nn.Module):
    """Routed experts of one MoE block that read each selected expert from the checkpoint as they run.

    Stands in for transformers' ``NemotronHExperts``, which stores every expert of the layer as
    fused 3-D parameters. :meth:`forward` does the arithmetic of its eager loop (transformers
    5.25.0) in the same order, on the same float32 values, but reads, cuts and converts one
    expert's ``up_proj`` and ``down_proj`` at a time and frees them before the next expert. A
    block that runs several micro-batches reads each selected expert once per micro-batch.

    ``observer``, when set, receives the child expert id and the ``up_proj`` and ``down_proj``
    inputs of every expert that runs.
    """

    def __init__(
        self, fused: nn.Module, experts: dict[str, list[TensorSlice]], checkpoint: Checkpoint, cutter: TensorCutter
    ) -> None:
        super().__init__()
        self.num_experts = fused.num_experts
        self.act_fn = fused.act_fn
        self.up_slices = experts["up_proj"]  # child expert -> cut of the parent's [I, H] weight
        self.down_slices = experts["down_proj"]  # child expert -> cut of the parent's [H, I] weight
        self.checkpoint = checkpoint
        self.cutter = cutter
        self.observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def read(self, tensor: TensorSlice, device: torch.device) -> torch.Tensor:
        """Read one expert weight, cut it for the budget and return it in float32."""
        return self.cutter.cut(self.checkpoint.read(tensor.source), tensor.keep).float().to(device)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # hidden_states [tokens, H]; top_k_index and top_k_weights [tokens, top_k]
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)  # [E + 1, top_k, tokens]
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            expert = int(expert_idx)
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]  # [routed tokens, H]
            up_proj = self.read(self.up_slices[expert], hidden_states.device)
            gate = nn.functional.linear(current_state, up_proj)
            del up_proj
            current_hidden_states = self.act_fn(gate)  # [routed tokens, I]
            if self.observer is not None:
                self.observer(expert, current_state, current_hidden_states)
            down_proj = self.read(self.down_slices[expert], hidden_states.device)
            current_hidden_states = nn.functional.linear(current_hidden_states, down_proj)
            del down_proj
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

        return final_hidden_states


def _forward(block: nn.Module, run: _BudgetRun, micro_batch: int, device: str | torch.device) -> None:
    """Run a block over every micro-batch of a budget's hidden states, replacing them."""
    from transformers.masking_utils import create_causal_mask

    assert run.hidden is not None
    for start in range(0, run.hidden.shape[0], micro_batch):
        hidden = run.hidden[start : start + micro_batch].to(device)  # [batch, seq_len, child H]
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = None
        if block.block_type == "full_attention":
            mask = create_causal_mask(
                config=run.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
            )
        output = block(hidden, attention_mask=mask, position_ids=positions, use_cache=False)
        run.hidden[start : start + micro_batch] = output.to(run.hidden.device)


@contextmanager
def _observe(
    block: nn.Module, layer: int, kept_experts: tuple[int, ...] | None, stats: _Observations, kv_cache: bool
) -> Iterator[None]:
    """Record, under parent names, the max |input| of every Linear of a block while it runs."""
    prefix = f"backbone.layers.{layer}"
    handles = []

    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(_input_hook(stats, f"{prefix}.{name}")))
    if kv_cache and block.block_type == "full_attention":
        handles.append(block.mixer.k_proj.register_forward_hook(_kv_hook(stats, f"{prefix}.mixer", 0)))
        handles.append(block.mixer.v_proj.register_forward_hook(_kv_hook(stats, f"{prefix}.mixer", 1)))
    experts = block.mixer.experts if block.block_type == "moe" else None
    if experts is not None:
        assert kept_experts is not None
        experts.observer = _experts_observer(stats, layer, kept_experts)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if experts is not None:
            experts.observer = None


def _input_hook(stats: _Observations, name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        stats.record(name, _amax(args[0]))

    return hook


def _kv_hook(stats: _Observations, prefix: str, index: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        stats.record_kv(prefix, index, _amax(output))

    return hook


def _experts_observer(stats: _Observations, layer: int, kept_experts: tuple[int, ...]):
    """Record routed experts' inputs under parent expert ids, and mark each expert that ran as reached."""
    prefix = f"backbone.layers.{layer}.mixer.experts"
    reached = stats.reached.setdefault(layer, set())

    def observe(expert: int, up_input: torch.Tensor, down_input: torch.Tensor) -> None:
        parent_expert = kept_experts[expert]
        reached.add(parent_expert)
        stats.record(f"{prefix}.{parent_expert}.up_proj", _amax(up_input))
        stats.record(f"{prefix}.{parent_expert}.down_proj", _amax(down_input))

    return observe


def _observe_lm_head(source: ElasticSource, runs: list[_BudgetRun], stats: _Observations, cutter: TensorCutter) -> None:
    """Record the ``lm_head`` input: the final RMSNorm of each budget's last hidden states."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm

    log.info("observing the lm_head input for %d budget(s)", len(runs))
    weight = source.checkpoint.read(FINAL_NORM)
    for run in runs:
        assert run.hidden is not None
        norm = NemotronHRMSNorm(run.config.hidden_size, eps=run.config.layer_norm_epsilon)
        norm.weight.data = cutter.cut(weight, run.global_slice(FINAL_NORM).keep).float()
        stats.record(LM_HEAD, _amax(norm(run.hidden)))


def fill_unreached_experts(
    arch: NemotronHArch,
    input_amax: dict[str, float],
    reached: dict[int, set[int]],
    kept_experts: list[dict[int, tuple[int, ...]]],
) -> tuple[dict[str, float], dict[int, list[int]]]:
    """Give every routed expert no token reached an amax, by the rule documented in :func:`calibrate`.

    Args:
        arch: The parent architecture.
        input_amax: Observed amax per parent module name.
        reached: Parent MoE layer to the parent expert ids some token reached.
        kept_experts: Per budget, parent MoE layer to the experts the budget keeps; an MoE
            layer that appears in none of them is not filled.

    Returns:
        A copy of ``input_amax`` completed for every expert of every run MoE layer, and the
        unreached expert ids per layer (only layers with at least one).
    """
    filled = dict(input_amax)
    run_layers = sorted({layer for keep in kept_experts for layer in keep})

    def expert_name(layer: int, expert: int, projection: str) -> str:
        return f"backbone.layers.{layer}.mixer.experts.{expert}.{projection}"

    model_down = [
        input_amax[expert_name(layer, expert, "down_proj")] for layer, experts in reached.items() for expert in experts
    ]
    unreached: dict[int, list[int]] = {}
    for layer in run_layers:
        hit = sorted(reached.get(layer, set()))
        missing = [expert for expert in range(arch.n_routed_experts) if expert not in reached.get(layer, set())]
        if not missing:
            continue
        unreached[layer] = missing
        substitutes = {}
        for projection in ("up_proj", "down_proj"):
            observed = [input_amax[expert_name(layer, expert, projection)] for expert in hit]
            if observed:
                substitutes[projection] = max(observed)
                continue
            if projection == "up_proj":
                shared = input_amax.get(f"backbone.layers.{layer}.mixer.shared_experts.up_proj")
                substitutes[projection] = shared if shared is not None else FALLBACK_AMAX
            else:
                substitutes[projection] = max(model_down) if model_down else FALLBACK_AMAX
        for expert in missing:
            for projection, value in substitutes.items():
                filled[expert_name(layer, expert, projection)] = value
        log.warning(
            "layer %d: no calibration token reached routed expert(s) %s, so their amax is %.4g (up_proj) "
            "and %.4g (down_proj)",
            layer, missing, substitutes["up_proj"], substitutes["down_proj"],
        )
    return filled, unreached


def _check_finite(input_amax: dict[str, float], kv_amax: dict[str, tuple[float, float]]) -> None:
    values = list(input_amax.items())
    for prefix, (k_amax, v_amax) in kv_amax.items():
        values += [(f"{prefix}.k_proj output", k_amax), (f"{prefix}.v_proj output", v_amax)]
    for name, value in values:
        if not math.isfinite(value):
            raise CheckpointError(
                f"the calibrated amax of {name} is {value}, not a finite number",
                "the weights overflow in float32 on this text; check the checkpoint or the calibration data",
            )
