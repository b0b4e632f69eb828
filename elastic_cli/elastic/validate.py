"""Validation of a budget hierarchy before any work.

Checks that every budget is nested in the one listed before it, that the largest keeps everything
unless declared partial, and that each budget is structurally sliceable: its masks give a model
the stock NemotronH config can express exactly and transformers' MoE router can run. Every
problem is reported with budget, layer and axis; nothing stops at the first one.
"""

from __future__ import annotations

from collections import Counter

from elastic_cli.arch.nemotron_h import LayerKind, NemotronHArch
from elastic_cli.elastic.masks import Axis, Budget, Mask, MaskProblem


def group_counts(mask: Mask, groups: int) -> list[int]:
    """Count kept entries in each of ``groups`` equal contiguous groups of a mask."""
    size = len(mask) // groups
    return [sum(mask[g * size : (g + 1) * size]) for g in range(groups)]


def validate_budgets(arch: NemotronHArch, budgets: list[Budget]) -> list[MaskProblem]:
    """Return every problem of a budget hierarchy (an empty list means it is sound)."""
    problems: list[MaskProblem] = []
    if budgets:
        largest = budgets[0]
        drops = any(not all(mask) for _, _, mask in largest.masks())
        if drops and not largest.partial:
            problems.append(
                MaskProblem(
                    largest.name,
                    None,
                    None,
                    "the largest budget drops components but is not declared partial; "
                    "keep everything or set \"partial\": true",
                )
            )
    for budget in budgets:
        problems.extend(_structure_problems(arch, budget))
    for larger, smaller in zip(budgets, budgets[1:]):
        problems.extend(_nesting_problems(larger, smaller))
    return problems


def _nesting_problems(larger: Budget, smaller: Budget) -> list[MaskProblem]:
    problems = []
    outer = {(layer, axis): mask for layer, axis, mask in larger.masks()}
    for layer, axis, mask in smaller.masks():
        extra = [i for i, (inner, keep) in enumerate(zip(mask, outer[(layer, axis)])) if inner and not keep]
        if extra:
            problems.append(
                MaskProblem(
                    smaller.name,
                    layer,
                    axis.value,
                    f"keeps {len(extra)} component(s) that the larger budget '{larger.name}' drops "
                    f"(first index {extra[0]}); budgets must be nested",
                )
            )
    return problems


def _structure_problems(arch: NemotronHArch, budget: Budget) -> list[MaskProblem]:
    problems = []

    def add(layer: int | None, axis: Axis | None, message: str) -> None:
        problems.append(MaskProblem(budget.name, layer, axis.value if axis else None, message))

    if not any(budget.hidden):
        add(None, Axis.HIDDEN, "keeps no embedding channel")
    if not any(budget.layers):
        add(None, Axis.LAYERS, "keeps no layer")

    kept_layers = [layer for layer, keep in enumerate(budget.layers) if keep]
    for layer in kept_layers:
        kind = arch.layer_kinds[layer]
        if kind is LayerKind.MAMBA:
            _check_mamba(arch, budget, layer, add)
        elif kind is LayerKind.ATTENTION:
            _check_attention(arch, budget, layer, add)
        elif kind is LayerKind.MLP:
            if not any(budget.mask(Axis.FFN_CHANNELS, layer)):
                add(layer, Axis.FFN_CHANNELS, "keeps no FFN channel; drop the layer with the 'layers' mask instead")
        else:
            _check_moe(arch, budget, layer, add)

    # The stock config has one width per axis for all layers. FFN widths may differ (the slicer
    # zero-pads them, which is exact for ReLU^2); the other widths must agree across layers.
    uniform = [
        (LayerKind.MAMBA, Axis.MAMBA_HEADS, "mamba_num_heads"),
        (LayerKind.MAMBA, Axis.MAMBA_HEAD_CHANNELS, "mamba_head_dim"),
        (LayerKind.ATTENTION, Axis.ATTENTION_HEADS, "num_attention_heads"),
        (LayerKind.MOE, Axis.EXPERTS, "n_routed_experts"),
    ]
    for kind, axis, field in uniform:
        counts = {layer: sum(budget.mask(axis, layer)) for layer in kept_layers if arch.layer_kinds[layer] is kind}
        if len(set(counts.values())) > 1:
            common, _ = Counter(counts.values()).most_common(1)[0]
            reference = next(layer for layer, count in counts.items() if count == common)
            for layer, count in counts.items():
                if count != common:
                    add(
                        layer,
                        axis,
                        f"keeps {count} but layer {reference} keeps {common}; the config has one "
                        f"'{field}' for all {kind.value} layers, so this budget cannot be sliced exactly",
                    )
    mamba_groups = {
        layer: sum(1 for count in group_counts(budget.mask(Axis.MAMBA_HEADS, layer), arch.n_groups) if count)
        for layer in kept_layers
        if arch.layer_kinds[layer] is LayerKind.MAMBA
    }
    if len(set(mamba_groups.values())) > 1:
        odd = max(mamba_groups, key=lambda layer: (mamba_groups[layer] != min(mamba_groups.values()), -layer))
        add(odd, Axis.MAMBA_HEADS, "layers keep different numbers of whole Mamba groups; the config has one 'n_groups'")
    return problems


def _check_mamba(arch: NemotronHArch, budget: Budget, layer: int, add) -> None:
    heads = budget.mask(Axis.MAMBA_HEADS, layer)
    counts = group_counts(heads, arch.n_groups)
    nonzero = {count for count in counts if count}
    if not nonzero:
        add(layer, Axis.MAMBA_HEADS, "keeps no Mamba head; drop the layer with the 'layers' mask instead")
    elif len(nonzero) > 1:
        add(
            layer,
            Axis.MAMBA_HEADS,
            f"keeps {counts} heads per group; exact slicing needs the same count in every kept group "
            "(or whole groups dropped)",
        )
    if not any(budget.mask(Axis.MAMBA_HEAD_CHANNELS, layer)):
        add(layer, Axis.MAMBA_HEAD_CHANNELS, "keeps no Mamba head channel")


def _check_attention(arch: NemotronHArch, budget: Budget, layer: int, add) -> None:
    counts = group_counts(budget.mask(Axis.ATTENTION_HEADS, layer), arch.num_key_value_heads)
    if len(set(counts)) > 1 or counts[0] == 0:
        add(
            layer,
            Axis.ATTENTION_HEADS,
            f"keeps {counts} query heads per KV head; every KV head needs the same non-zero count, "
            f"so kept heads must be a multiple of {arch.num_key_value_heads} KV heads",
        )


def _check_moe(arch: NemotronHArch, budget: Budget, layer: int, add) -> None:
    experts = budget.mask(Axis.EXPERTS, layer)
    kept = sum(experts)
    if kept < arch.num_experts_per_tok:
        add(layer, Axis.EXPERTS, f"keeps {kept} experts, fewer than num_experts_per_tok {arch.num_experts_per_tok}")
    counts = group_counts(experts, arch.n_group)
    if kept % arch.n_group != 0:
        add(layer, Axis.EXPERTS, f"keeps {kept} experts, not divisible by n_group {arch.n_group}")
    elif len(set(counts)) > 1:
        add(layer, Axis.EXPERTS, f"keeps {counts} experts per routing group; group-limited routing needs equal counts")
    elif kept >= arch.num_experts_per_tok:
        _check_routing_groups(arch, counts[0], layer, add)
    if not any(budget.mask(Axis.EXPERT_CHANNELS, layer)):
        add(layer, Axis.EXPERT_CHANNELS, "keeps no expert FFN channel")
    if not any(budget.mask(Axis.SHARED_EXPERT_CHANNELS, layer)):
        add(layer, Axis.SHARED_EXPERT_CHANNELS, "keeps no shared-expert FFN channel")


def _check_routing_groups(arch: NemotronHArch, per_group: int, layer: int, add) -> None:
    """Check that the NemotronH router of transformers 5.25.0 can route among the kept experts.

    Args:
        per_group: Experts kept in each of the ``n_group`` routing groups (equal in every group).
    """
    # The router scores each routing group by the sum of its two best experts (a top-2 inside
    # every group, also with n_group 1), so a group of one expert raises RuntimeError
    # "selected index k out of range".
    if per_group < 2:
        add(
            layer,
            Axis.EXPERTS,
            f"keeps {per_group} expert(s) per routing group (n_group {arch.n_group}); the NemotronH router "
            "scores each group by its two best experts, so every group needs at least 2",
        )
        return

    # Only the topk_group best groups stay selectable, because the router sets the scores of the
    # other groups to -inf before its final top num_experts_per_tok. With fewer selectable experts,
    # it raises nothing but fills the remaining slots with experts of rejected groups, picked by
    # the tie order of -inf scores.
    selectable = per_group * arch.topk_group
    if selectable < arch.num_experts_per_tok:
        add(
            layer,
            Axis.EXPERTS,
            f"keeps {per_group} experts per routing group, so the {arch.topk_group} group(s) selected by "
            f"topk_group offer {selectable} experts, fewer than num_experts_per_tok {arch.num_experts_per_tok}; "
            "keep more experts per group",
        )
