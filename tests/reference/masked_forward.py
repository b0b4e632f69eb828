"""Masked forward pass of a NemotronH parent checkpoint, the reference for slicing tests.

A child sliced from a parent by keep masks is correct when transformers, loading the child, returns
the logits that `masked_forward` returns for the parent under the same masks. This module never
removes a row or column to get there. It runs every full-size parent tensor in fp32 and applies
each mask as what it means: dropped channels are zero, dropped experts cannot be selected, dropped
layers are skipped, and every RMSNorm averages over the kept channels only.

The code follows the NemotronH equations and was written independently of transformers' modeling
code. The Mamba-2 scan is a plain loop over time steps, so it suits small test models only.

Mask format (every key is optional and a missing key keeps everything; each value is a 1-D bool
tensor in which True keeps the entry)::

    {"hidden": [hidden_size],
     "layers": [num_layers],
     "per_layer": {layer_index: {             # int, parent numbering
         "mamba_heads": [mamba_num_heads],
         "mamba_head_channels": [mamba_head_dim],
         "attention_heads": [num_attention_heads],
         "ffn_channels": [intermediate_size],
         "experts": [n_routed_experts],
         "expert_channels": [moe_intermediate_size],
         "shared_expert_channels": [moe_shared_expert_intermediate_size]}}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAMBA = "mamba"
ATTENTION = "attention"
MLP = "mlp"
MOE = "moe"

# Layer kinds as `hybrid_override_pattern` (remote-code configs) spells them.
PATTERN_LAYER_KINDS = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}

# Layer kinds as `layers_block_type` spells them, with the legacy names transformers 5.25 remaps.
BLOCK_TYPE_LAYER_KINDS = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}

# Per-layer masks that each layer kind accepts.
LAYER_MASK_NAMES = {
    MAMBA: ("mamba_heads", "mamba_head_channels"),
    ATTENTION: ("attention_heads",),
    MLP: ("ffn_channels",),
    MOE: ("experts", "expert_channels", "shared_expert_channels"),
}

# Defaults of NemotronHConfig in transformers 5.25.0 for the fields the forward pass reads.
CONFIG_DEFAULTS = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "layer_norm_epsilon": 1e-5,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "n_groups": 8,
    "ssm_state_size": 128,
    "conv_kernel": 4,
    "time_step_limit": (0.0, math.inf),
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 21504,
    "n_routed_experts": 8,
    "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "moe_latent_size": None,
}

# Older config names that transformers 5.25.0 accepts and that win over the current name.
CONFIG_LEGACY_NAMES = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "time_step_limit": "mamba_dt_limit",
}

# Added to the sum of the selected experts' scores before renormalising, as NemotronH does.
ROUTER_NORM_EPSILON = 1e-20


@dataclass(frozen=True)
class NemotronHSettings:
    """Fields of a NemotronH config.json that the forward pass reads, with defaults filled in."""

    layer_kinds: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    layer_norm_epsilon: float
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    time_step_limit: tuple[float, float]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    n_routed_experts: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    tie_word_embeddings: bool


def read_layer_kinds(config: dict) -> tuple[str, ...]:
    """Read the kind of every layer (`mamba`, `attention`, `mlp` or `moe`) from a raw config.

    `layers_block_type` wins over `hybrid_override_pattern` when a config has both, as in
    transformers 5.25.0.

    Raises:
        ValueError: the config has neither field, an unknown layer type, or a
            `num_hidden_layers` that disagrees with the layer list.
    """
    block_types = config.get("layers_block_type", config.get("layer_types"))
    pattern = config.get("hybrid_override_pattern")

    if block_types is not None:
        unknown = sorted(set(block_types) - set(BLOCK_TYPE_LAYER_KINDS))
        if unknown:
            raise ValueError(
                f"layers_block_type contains unknown types {unknown}; "
                f"expected {sorted(BLOCK_TYPE_LAYER_KINDS)}"
            )
        kinds = tuple(BLOCK_TYPE_LAYER_KINDS[block_type] for block_type in block_types)
    elif pattern is not None:
        unknown = sorted(set(pattern) - set(PATTERN_LAYER_KINDS))
        if unknown:
            raise ValueError(
                f"hybrid_override_pattern {pattern!r} contains unknown characters {unknown}; "
                f"expected {sorted(PATTERN_LAYER_KINDS)}"
            )
        kinds = tuple(PATTERN_LAYER_KINDS[char] for char in pattern)
    else:
        raise ValueError("config has neither layers_block_type nor hybrid_override_pattern")

    num_hidden_layers = config.get("num_hidden_layers")
    if num_hidden_layers is not None and num_hidden_layers != len(kinds):
        raise ValueError(
            f"num_hidden_layers is {num_hidden_layers} but the layer list has {len(kinds)} entries"
        )
    return kinds


def read_settings(config: dict) -> NemotronHSettings:
    """Read the fields the forward pass needs from a raw NemotronH config.json dict.

    Missing fields take transformers 5.25.0's NemotronHConfig defaults.

    Raises:
        ValueError: the config requires a variant this reference does not implement
            (an MLP activation other than relu2, a Mamba activation other than silu, or an MoE
            latent projection), or its layer list is invalid.
    """
    values = dict(CONFIG_DEFAULTS)
    for name in CONFIG_DEFAULTS:
        legacy_name = CONFIG_LEGACY_NAMES.get(name)
        if legacy_name is not None and legacy_name in config:
            values[name] = config[legacy_name]
        elif name in config:
            values[name] = config[name]

    if values["mlp_hidden_act"] != "relu2":
        raise ValueError(f"mlp_hidden_act {values['mlp_hidden_act']!r} is not supported; expected 'relu2'")
    if values["mamba_hidden_act"] != "silu":
        raise ValueError(
            f"mamba_hidden_act {values['mamba_hidden_act']!r} is not supported; expected 'silu'"
        )
    if values["moe_latent_size"] is not None:
        raise ValueError("moe_latent_size is set, but MoE latent projections are not supported")

    # transformers falls back to one KV head per query head when the field is null.
    num_key_value_heads = values["num_key_value_heads"]
    if num_key_value_heads is None:
        num_key_value_heads = values["num_attention_heads"]

    lower_limit, upper_limit = values["time_step_limit"]
    return NemotronHSettings(
        layer_kinds=read_layer_kinds(config),
        vocab_size=int(values["vocab_size"]),
        hidden_size=int(values["hidden_size"]),
        layer_norm_epsilon=float(values["layer_norm_epsilon"]),
        mamba_num_heads=int(values["mamba_num_heads"]),
        mamba_head_dim=int(values["mamba_head_dim"]),
        n_groups=int(values["n_groups"]),
        ssm_state_size=int(values["ssm_state_size"]),
        conv_kernel=int(values["conv_kernel"]),
        time_step_limit=(parse_json_float(lower_limit), parse_json_float(upper_limit)),
        num_attention_heads=int(values["num_attention_heads"]),
        num_key_value_heads=int(num_key_value_heads),
        head_dim=int(values["head_dim"]),
        intermediate_size=int(values["intermediate_size"]),
        n_routed_experts=int(values["n_routed_experts"]),
        moe_intermediate_size=int(values["moe_intermediate_size"]),
        moe_shared_expert_intermediate_size=int(values["moe_shared_expert_intermediate_size"]),
        num_experts_per_tok=int(values["num_experts_per_tok"]),
        n_group=int(values["n_group"]),
        topk_group=int(values["topk_group"]),
        norm_topk_prob=bool(values["norm_topk_prob"]),
        routed_scaling_factor=float(values["routed_scaling_factor"]),
        tie_word_embeddings=bool(values["tie_word_embeddings"]),
    )


def parse_json_float(value: object) -> float:
    """Parse a float that a config.json may spell as a number, a string or a tagged object.

    transformers 5.25.0 writes infinity as `{"__float__": "Infinity"}`. Remote-code configs write
    the bare JSON extension `Infinity`, which `json.load` already turns into a float.
    """
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"invalid float in config: {value!r}")


def masked_forward(
    config: dict,
    tensors: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    masks: dict | None = None,
) -> torch.Tensor:
    """Run the parent checkpoint with `masks` applied and return its logits.

    Every tensor is cast to fp32 and every step runs in fp32. Biases are added where the
    checkpoint has a `.bias` tensor next to a weight. Attention is causal over the whole sequence
    (no padding) and, as in NemotronH, has no positional embedding.

    Args:
        config: the raw config.json dict of the parent.
        tensors: the parent's tensors under their on-disk names (`backbone.*`, `lm_head.weight`).
        input_ids: token ids, [batch, seq].
        masks: keep masks in the format of this module's docstring; None keeps everything.

    Returns:
        fp32 logits, [batch, seq, vocab_size].

    Raises:
        ValueError: a mask is malformed or leaves a token fewer selectable experts than
            `num_experts_per_tok`, or the config is unsupported.
        KeyError: a tensor the layout needs is missing.
    """
    settings = read_settings(config)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")

    embeddings = _read_tensor(tensors, "backbone.embeddings.weight")
    resolved_masks = resolve_masks(settings, masks, embeddings.device)
    hidden_keep = resolved_masks.hidden
    residual = embeddings[input_ids.to(embeddings.device)] * hidden_keep

    for layer_index, kind in enumerate(settings.layer_kinds):
        if not resolved_masks.layers[layer_index]:
            continue

        prefix = f"backbone.layers.{layer_index}."
        normed = rms_norm_over_kept(
            residual, _read_tensor(tensors, prefix + "norm.weight"), hidden_keep, settings.layer_norm_epsilon
        )
        mixer = MIXERS[kind]
        mixer_output = mixer(normed, tensors, prefix + "mixer.", settings, resolved_masks.per_layer[layer_index])
        residual = residual + mixer_output * hidden_keep

    final = rms_norm_over_kept(
        residual, _read_tensor(tensors, "backbone.norm_f.weight"), hidden_keep, settings.layer_norm_epsilon
    )
    return F.linear(final, _read_lm_head(tensors, settings))


@dataclass(frozen=True)
class ResolvedMasks:
    """Keep masks with absent entries filled in: `layers` as bools, the rest as float tensors of 0.0 and 1.0."""

    hidden: torch.Tensor
    layers: tuple[bool, ...]
    per_layer: tuple[dict[str, torch.Tensor], ...]


def resolve_masks(
    settings: NemotronHSettings, masks: dict | None, device: torch.device | str = "cpu"
) -> ResolvedMasks:
    """Check `masks` against the layout, fill every absent mask with all-True and move them to `device`.

    Raises:
        ValueError: an unknown key, a per-layer mask that does not fit the layer's kind, a mask
            that is not a 1-D bool tensor of the expected length, or a hidden mask with no kept
            channel.
    """
    masks = {} if masks is None else masks
    unknown_keys = sorted(set(masks) - {"hidden", "layers", "per_layer"})
    if unknown_keys:
        raise ValueError(f"unknown mask keys {unknown_keys}; expected 'hidden', 'layers', 'per_layer'")

    num_layers = len(settings.layer_kinds)
    hidden = _check_mask(masks.get("hidden"), settings.hidden_size, "hidden")
    if not hidden.any():
        raise ValueError("the hidden mask keeps no channel")
    layers = _check_mask(masks.get("layers"), num_layers, "layers")

    per_layer_masks = masks.get("per_layer") or {}
    for layer_index in per_layer_masks:
        if isinstance(layer_index, bool) or not isinstance(layer_index, int):
            raise ValueError(f"per_layer key {layer_index!r} is not an int layer index")
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"per_layer key {layer_index} is out of range for {num_layers} layers")

    expected_lengths = _layer_mask_lengths(settings)
    per_layer = []
    for layer_index, kind in enumerate(settings.layer_kinds):
        requested = per_layer_masks.get(layer_index, {})
        unexpected = sorted(set(requested) - set(LAYER_MASK_NAMES[kind]))
        if unexpected:
            raise ValueError(
                f"layer {layer_index} is a {kind} layer and takes masks {list(LAYER_MASK_NAMES[kind])}; "
                f"got {unexpected}"
            )
        layer_masks = {}
        for name in LAYER_MASK_NAMES[kind]:
            mask = _check_mask(requested.get(name), expected_lengths[name], f"per_layer[{layer_index}][{name!r}]")
            layer_masks[name] = mask.to(device=device, dtype=torch.float32)
        per_layer.append(layer_masks)

    return ResolvedMasks(
        hidden=hidden.to(device=device, dtype=torch.float32),
        layers=tuple(bool(keep) for keep in layers),
        per_layer=tuple(per_layer),
    )


def _layer_mask_lengths(settings: NemotronHSettings) -> dict[str, int]:
    return {
        "mamba_heads": settings.mamba_num_heads,
        "mamba_head_channels": settings.mamba_head_dim,
        "attention_heads": settings.num_attention_heads,
        "ffn_channels": settings.intermediate_size,
        "experts": settings.n_routed_experts,
        "expert_channels": settings.moe_intermediate_size,
        "shared_expert_channels": settings.moe_shared_expert_intermediate_size,
    }


def _check_mask(mask: torch.Tensor | None, length: int, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(length, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        description = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask {name} must be a bool tensor; got {description}")
    if mask.shape != (length,):
        raise ValueError(f"mask {name} must have shape ({length},); got {tuple(mask.shape)}")
    return mask


def _read_tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise KeyError(f"tensor {name!r} not found in the checkpoint tensors")
    return tensors[name].float()


def _read_bias(tensors: dict[str, torch.Tensor], weight_name: str) -> torch.Tensor | None:
    bias = tensors.get(weight_name.removesuffix(".weight") + ".bias")
    return None if bias is None else bias.float()


def _read_lm_head(tensors: dict[str, torch.Tensor], settings: NemotronHSettings) -> torch.Tensor:
    # NOTE: transformers 5.25.0 never ties NemotronH's lm_head to the embeddings, even with
    # tie_word_embeddings set, so a stored lm_head.weight wins over the flag here too.
    if "lm_head.weight" in tensors:
        return _read_tensor(tensors, "lm_head.weight")
    if settings.tie_word_embeddings:
        return _read_tensor(tensors, "backbone.embeddings.weight")
    raise KeyError("tensor 'lm_head.weight' not found and tie_word_embeddings is false")


def _linear(inputs: torch.Tensor, tensors: dict[str, torch.Tensor], weight_name: str) -> torch.Tensor:
    return F.linear(inputs, _read_tensor(tensors, weight_name), _read_bias(tensors, weight_name))


def rms_norm_over_kept(
    hidden: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Apply RMSNorm with the mean of squares taken over kept channels only. Dropped channels output zero.

    Args:
        hidden: [..., hidden_size].
        weight: [hidden_size].
        keep: [hidden_size], 1.0 for kept channels and 0.0 for dropped ones.
        epsilon: added to the mean of squares.
    """
    mean_square = (hidden.square() * keep).sum(-1, keepdim=True) / keep.sum()
    return weight * (hidden * torch.rsqrt(mean_square + epsilon)) * keep


def relu2_mlp(
    hidden: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    channel_keep: torch.Tensor,
) -> torch.Tensor:
    """Run a ReLU² MLP (`up_proj`, `down_proj`, no gate) whose dropped channels output zero.

    Args:
        hidden: [..., hidden_size].
        prefix: the MLP's name prefix, ending in a dot.
        channel_keep: [intermediate], 1.0 for kept channels and 0.0 for dropped ones.
    """
    activation = F.relu(_linear(hidden, tensors, prefix + "up_proj.weight")).square() * channel_keep
    return _linear(activation, tensors, prefix + "down_proj.weight")


def mlp_mixer(
    hidden: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    settings: NemotronHSettings,
    layer_masks: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Run a dense MLP layer's mixer on normalised hidden states [batch, seq, hidden_size]."""
    return relu2_mlp(hidden, tensors, prefix, layer_masks["ffn_channels"])


def attention_mixer(
    hidden: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    settings: NemotronHSettings,
    layer_masks: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Run causal grouped-query attention without positional embedding; dropped query heads output zero."""
    batch, seq, _ = hidden.shape
    num_heads = settings.num_attention_heads
    num_kv_heads = settings.num_key_value_heads
    head_dim = settings.head_dim

    # [batch, heads, seq, head_dim]
    query = _linear(hidden, tensors, prefix + "q_proj.weight").view(batch, seq, num_heads, head_dim).transpose(1, 2)
    key = _linear(hidden, tensors, prefix + "k_proj.weight").view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    value = _linear(hidden, tensors, prefix + "v_proj.weight").view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)

    # Query head h reads KV head h // (num_heads / num_kv_heads).
    kv_head_of_query = torch.arange(num_heads, device=hidden.device) // (num_heads // num_kv_heads)
    key = key[:, kv_head_of_query]
    value = value[:, kv_head_of_query]

    scores = query @ key.transpose(-1, -2) * head_dim**-0.5  # [batch, heads, seq, seq]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    heads_output = scores.softmax(dim=-1) @ value  # [batch, heads, seq, head_dim]

    heads_output = heads_output * layer_masks["attention_heads"].view(1, num_heads, 1, 1)
    heads_output = heads_output.transpose(1, 2).reshape(batch, seq, num_heads * head_dim)
    return _linear(heads_output, tensors, prefix + "o_proj.weight")


def causal_depthwise_conv1d(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Convolve each channel with its own kernel over past and current steps only.

    Args:
        inputs: [batch, seq, channels].
        weight: [channels, 1, kernel]. Tap `kernel - 1` multiplies the current step.
        bias: [channels] or None.
    """
    seq = inputs.shape[1]
    kernel = weight.shape[-1]
    padded = F.pad(inputs, (0, 0, kernel - 1, 0))  # kernel - 1 zero steps before the sequence
    output = torch.zeros_like(inputs)
    for tap in range(kernel):
        output = output + padded[:, tap : tap + seq] * weight[:, 0, tap]
    if bias is not None:
        output = output + bias
    return output


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """Run the Mamba-2 recurrence one time step at a time from a zero state.

    Per head h of group g: state = exp(dt·A) · state + dt · x ⊗ B, y = state · C + D · x.

    Args:
        x: [batch, seq, heads, head_dim].
        dt: [batch, seq, heads], after softplus and clamping.
        A: [heads], negative.
        B, C: [batch, seq, groups, state_size]; head h reads group h // (heads / groups).
        D: [heads].

    Returns:
        y: [batch, seq, heads, head_dim].
    """
    batch, seq, num_heads, head_dim = x.shape
    heads_per_group = num_heads // B.shape[2]
    B_per_head = B.repeat_interleave(heads_per_group, dim=2)  # [batch, seq, heads, state_size]
    C_per_head = C.repeat_interleave(heads_per_group, dim=2)

    state = x.new_zeros(batch, num_heads, head_dim, B.shape[-1])
    outputs = []
    for step in range(seq):
        step_dt = dt[:, step, :, None, None]  # [batch, heads, 1, 1]
        step_x = x[:, step, :, :, None]  # [batch, heads, head_dim, 1]
        step_B = B_per_head[:, step, :, None, :]  # [batch, heads, 1, state_size]
        state = torch.exp(step_dt * A[:, None, None]) * state + step_dt * step_x * step_B

        step_C = C_per_head[:, step, :, :, None]  # [batch, heads, state_size, 1]
        outputs.append((state @ step_C).squeeze(-1) + D[:, None] * x[:, step])
    return torch.stack(outputs, dim=1)


def gated_group_rms_norm(
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    channel_keep: torch.Tensor,
    n_groups: int,
    epsilon: float,
) -> torch.Tensor:
    """Multiply `y` by silu(gate), then RMS-normalise each group of channels over its kept channels.

    The gate is applied before normalising, as NemotronH's gated RMSNorm does. Dropped channels
    output zero, and so does every channel of a group with no kept channel.

    Args:
        y, gate: [batch, seq, inner], inner = mamba_num_heads * mamba_head_dim.
        weight: [inner].
        channel_keep: [inner], 1.0 for kept channels and 0.0 for dropped ones.
        n_groups: number of contiguous channel groups normalised separately.
    """
    batch, seq, inner = y.shape
    gated = (y * F.silu(gate) * channel_keep).view(batch, seq, n_groups, inner // n_groups)

    kept_per_group = channel_keep.view(n_groups, inner // n_groups).sum(-1, keepdim=True)
    mean_square = gated.square().sum(-1, keepdim=True) / kept_per_group.clamp(min=1.0)
    normalised = gated * torch.rsqrt(mean_square + epsilon)
    return weight * normalised.view(batch, seq, inner)


def mamba_mixer(
    hidden: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    settings: NemotronHSettings,
    layer_masks: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Run a Mamba-2 mixer in which channel (h, c) exists only when head h and channel c are both kept."""
    batch, seq, _ = hidden.shape
    num_heads = settings.mamba_num_heads
    head_dim = settings.mamba_head_dim
    n_groups = settings.n_groups
    state_size = settings.ssm_state_size
    inner = num_heads * head_dim
    group_width = n_groups * state_size

    # in_proj rows: [z (inner) | x (inner) | B (groups * state) | C (groups * state) | dt (heads)].
    projected = _linear(hidden, tensors, prefix + "in_proj.weight")
    gate, x_B_C, dt = projected.split([inner, inner + 2 * group_width, num_heads], dim=-1)

    conv_weight = _read_tensor(tensors, prefix + "conv1d.weight")
    x_B_C = F.silu(causal_depthwise_conv1d(x_B_C, conv_weight, _read_bias(tensors, prefix + "conv1d.weight")))
    x, B, C = x_B_C.split([inner, group_width, group_width], dim=-1)

    lower_limit, upper_limit = settings.time_step_limit
    dt = F.softplus(dt + _read_tensor(tensors, prefix + "dt_bias")).clamp(lower_limit, upper_limit)
    A = -torch.exp(_read_tensor(tensors, prefix + "A_log"))
    y = selective_scan(
        x.view(batch, seq, num_heads, head_dim),
        dt,
        A,
        B.view(batch, seq, n_groups, state_size),
        C.view(batch, seq, n_groups, state_size),
        _read_tensor(tensors, prefix + "D"),
    )

    channel_keep = (layer_masks["mamba_heads"][:, None] * layer_masks["mamba_head_channels"][None, :]).reshape(inner)
    normed = gated_group_rms_norm(
        y.reshape(batch, seq, inner),
        gate,
        _read_tensor(tensors, prefix + "norm.weight"),
        channel_keep,
        n_groups,
        settings.layer_norm_epsilon,
    )
    return _linear(normed, tensors, prefix + "out_proj.weight")


def route_tokens(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    expert_keep: torch.Tensor,
    settings: NemotronHSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts among the kept ones and return (indices, weights), both [tokens, top_k].

    Selection uses sigmoid(logits) + e_score_correction_bias with dropped experts at -inf. With
    n_group > 1, experts form n_group contiguous groups, each group scores the sum of its two best
    kept experts, and only the topk_group best groups stay selectable. Weights are the plain
    sigmoid scores of the picked experts, renormalised to sum 1 when norm_topk_prob is set, times
    routed_scaling_factor.

    NOTE: a group that keeps a single expert scores that expert alone, and a group that keeps none
    can never be chosen. A child with one expert per group has no transformers 5.25.0 counterpart,
    because its router takes the top 2 inside every group.

    Args:
        hidden: [tokens, hidden_size].
        gate_weight: [n_routed_experts, hidden_size].
        correction_bias: [n_routed_experts].
        expert_keep: [n_routed_experts], 1.0 for kept experts and 0.0 for dropped ones.

    Raises:
        ValueError: a token has fewer than num_experts_per_tok selectable experts.
    """
    num_experts = settings.n_routed_experts
    scores = torch.sigmoid(hidden @ gate_weight.T)  # [tokens, experts]
    selection = (scores + correction_bias).masked_fill(expert_keep == 0, -math.inf)

    if settings.n_group > 1:
        group_size = num_experts // settings.n_group
        grouped = selection.view(-1, settings.n_group, group_size)
        best_two = grouped.topk(min(2, group_size), dim=-1).values
        finite = best_two.isfinite()
        group_scores = torch.where(finite, best_two, 0.0).sum(-1)
        group_scores = group_scores.masked_fill(~finite.any(-1), -math.inf)  # [tokens, groups]

        chosen_groups = group_scores.topk(settings.topk_group, dim=-1).indices
        group_allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, chosen_groups, True)
        expert_allowed = group_allowed.repeat_interleave(group_size, dim=1)
        selection = selection.masked_fill(~expert_allowed, -math.inf)

    picked = selection.topk(settings.num_experts_per_tok, dim=-1)
    if picked.values.isinf().any():
        raise ValueError(
            f"the expert masks leave some token fewer than num_experts_per_tok="
            f"{settings.num_experts_per_tok} selectable experts"
        )

    weights = scores.gather(1, picked.indices)
    if settings.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + ROUTER_NORM_EPSILON)
    return picked.indices, weights * settings.routed_scaling_factor


def moe_mixer(
    hidden: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    settings: NemotronHSettings,
    layer_masks: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Run a MoE mixer: the weighted sum of each token's routed experts plus the shared expert."""
    batch, seq, hidden_size = hidden.shape
    tokens = hidden.reshape(batch * seq, hidden_size)
    expert_indices, expert_weights = route_tokens(
        tokens,
        _read_tensor(tensors, prefix + "gate.weight"),
        _read_tensor(tensors, prefix + "gate.e_score_correction_bias"),
        layer_masks["experts"],
        settings,
    )

    routed = torch.zeros_like(tokens)
    for expert in range(settings.n_routed_experts):
        token_rows, slots = (expert_indices == expert).nonzero(as_tuple=True)
        if token_rows.numel() == 0:
            continue
        expert_output = relu2_mlp(
            tokens[token_rows], tensors, f"{prefix}experts.{expert}.", layer_masks["expert_channels"]
        )
        routed.index_add_(0, token_rows, expert_output * expert_weights[token_rows, slots, None])

    shared = relu2_mlp(tokens, tensors, prefix + "shared_experts.", layer_masks["shared_expert_channels"])
    return (routed + shared).view(batch, seq, hidden_size)


MIXERS = {MAMBA: mamba_mixer, ATTENTION: attention_mixer, MLP: mlp_mixer, MOE: moe_mixer}
