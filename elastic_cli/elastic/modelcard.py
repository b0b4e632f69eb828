"""Model card (``README.md``) of a sliced child checkpoint."""

from __future__ import annotations

from elastic_cli.arch.nemotron_h import KIND_TO_CHAR, parse_config
from elastic_cli.elastic.plan import SlicePlan
from elastic_cli.elastic.source import ElasticSource


def format_params(count: int) -> str:
    """Write a parameter count as ``31.58B`` / ``412.3M``."""
    if count >= 10**9:
        return f"{count / 10**9:.2f}B"
    if count >= 10**6:
        return f"{count / 10**6:.1f}M"
    return f"{count / 10**3:.1f}K"


def render_model_card(source: ElasticSource, plan: SlicePlan, version: str) -> str:
    """Return the child's model card: parent, revision, budget and parameter counts.

    The card holds no timestamp and no absolute path, so the same inputs give the same bytes.
    """
    origin = source.origin
    revision = origin.revision or "local folder, no revision"
    arch = parse_config(plan.config)
    pattern = "".join(KIND_TO_CHAR[kind] for kind in arch.layer_kinds)
    lines = [
        "---",
        f"base_model: {origin.name}",
        "library_name: transformers",
        "tags:",
        "- nemotron-h",
        "- elastic",
        "- sliced",
        "---",
        "",
        f"# {origin.name.split('/')[-1]}: budget {plan.budget}",
        "",
        f"The `{plan.budget}` nested submodel of `{origin.name}` (revision `{revision}`), extracted",
        f"zero-shot by elastic {version}: the components this budget's masks drop were removed and the",
        "rest copied unchanged, with no training. It loads as a standard NemotronH checkpoint.",
        "",
        "| | value |",
        "|---|---|",
        f"| parent | `{origin.name}` |",
        f"| parent revision | `{revision}` |",
        f"| budget | `{plan.budget}` |",
        f"| total parameters | {plan.params:,} ({format_params(plan.params)}) |",
        f"| active parameters per token | {plan.active_params:,} ({format_params(plan.active_params)}) |",
        f"| layers | {arch.num_layers} (`{pattern}`) |",
        f"| hidden size | {arch.hidden_size} |",
        f"| budgets from | `{source.budgets_from.split('/')[-1]}` |",
        "",
    ]
    return "\n".join(lines)
