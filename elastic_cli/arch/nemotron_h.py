"""NemotronH described as data: config fields, layer kinds and tensor templates.

Every tensor of a NemotronH checkpoint is listed here with the slicing axis of each of its
dimensions. The planner reads these tables; it never parses names inside its loops.

On-disk layout (``backbone.`` prefix)::

    backbone.embeddings.weight                      [vocab, H]
    backbone.layers.{i}.norm.weight                 [H]
    backbone.layers.{i}.mixer.*                     per layer kind, below
    backbone.norm_f.weight                          [H]
    lm_head.weight                                  [vocab, H]   (absent when embeddings are tied)

Mamba-2 ``in_proj`` rows are ``[z (di) | x (di) | B (G*N) | C (G*N) | dt (nh)]`` with
``di = nh * head_dim``; ``conv1d`` runs over ``[x | B | C]``; head ``h`` reads group
``h // (nh / G)``.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Any

from elastic_cli.errors import ConfigError


class LayerKind(str, enum.Enum):
    """Kind of a NemotronH block, from the layer pattern."""

    MAMBA = "mamba"
    ATTENTION = "attention"
    MLP = "mlp"
    MOE = "moe"


# Remote-code configs spell the layer pattern as characters, native transformers configs as names.
PATTERN_CHARS: dict[str, LayerKind] = {
    "M": LayerKind.MAMBA,
    "*": LayerKind.ATTENTION,
    "-": LayerKind.MLP,
    "E": LayerKind.MOE,
}
NATIVE_NAMES: dict[str, LayerKind] = {
    "linear_attention": LayerKind.MAMBA,
    "full_attention": LayerKind.ATTENTION,
    "mlp": LayerKind.MLP,
    "moe": LayerKind.MOE,
}
KIND_TO_CHAR = {kind: char for char, kind in PATTERN_CHARS.items()}
KIND_TO_NATIVE = {kind: name for name, kind in NATIVE_NAMES.items()}


class Dim(str, enum.Enum):
    """Kind of index along one tensor dimension, which decides how slicing cuts it."""

    FULL = "full"  # never cut (vocab, conv kernel, KV heads)
    HIDDEN = "hidden"
    MAMBA_IN_PROJ = "mamba_in_proj"  # [z | x | B | C | dt]
    MAMBA_CONV = "mamba_conv"  # [x | B | C]
    MAMBA_INNER = "mamba_inner"  # di, head-major
    MAMBA_HEADS = "mamba_heads"
    ATTENTION_Q = "attention_q"  # heads * head_dim, head-major
    FFN = "ffn"
    EXPERTS = "experts"
    EXPERT_FFN = "expert_ffn"
    SHARED_FFN = "shared_ffn"


F, H = Dim.FULL, Dim.HIDDEN

# Tensor templates per layer kind: suffix after ``backbone.layers.{i}.mixer.`` -> dims.
# ``{e}`` stands for the expert index. Bias entries are optional and appear only when the
# config enables them.
MIXER_TENSORS: dict[LayerKind, dict[str, tuple[Dim, ...]]] = {
    LayerKind.MAMBA: {
        "in_proj.weight": (Dim.MAMBA_IN_PROJ, H),
        "in_proj.bias": (Dim.MAMBA_IN_PROJ,),
        "conv1d.weight": (Dim.MAMBA_CONV, F, F),
        "conv1d.bias": (Dim.MAMBA_CONV,),
        "A_log": (Dim.MAMBA_HEADS,),
        "D": (Dim.MAMBA_HEADS,),
        "dt_bias": (Dim.MAMBA_HEADS,),
        "norm.weight": (Dim.MAMBA_INNER,),
        "out_proj.weight": (H, Dim.MAMBA_INNER),
        "out_proj.bias": (H,),
    },
    LayerKind.ATTENTION: {
        "q_proj.weight": (Dim.ATTENTION_Q, H),
        "q_proj.bias": (Dim.ATTENTION_Q,),
        "k_proj.weight": (F, H),
        "k_proj.bias": (F,),
        "v_proj.weight": (F, H),
        "v_proj.bias": (F,),
        "o_proj.weight": (H, Dim.ATTENTION_Q),
        "o_proj.bias": (H,),
    },
    LayerKind.MLP: {
        "up_proj.weight": (Dim.FFN, H),
        "up_proj.bias": (Dim.FFN,),
        "down_proj.weight": (H, Dim.FFN),
        "down_proj.bias": (H,),
    },
    LayerKind.MOE: {
        "gate.weight": (Dim.EXPERTS, H),
        "gate.e_score_correction_bias": (Dim.EXPERTS,),
        "experts.{e}.up_proj.weight": (Dim.EXPERT_FFN, H),
        "experts.{e}.up_proj.bias": (Dim.EXPERT_FFN,),
        "experts.{e}.down_proj.weight": (H, Dim.EXPERT_FFN),
        "experts.{e}.down_proj.bias": (H,),
        "shared_experts.up_proj.weight": (Dim.SHARED_FFN, H),
        "shared_experts.up_proj.bias": (Dim.SHARED_FFN,),
        "shared_experts.down_proj.weight": (H, Dim.SHARED_FFN),
        "shared_experts.down_proj.bias": (H,),
    },
}
LAYER_NORM_TENSOR = ("norm.weight", (H,))
GLOBAL_TENSORS: dict[str, tuple[Dim, ...]] = {
    "backbone.embeddings.weight": (F, H),
    "backbone.norm_f.weight": (H,),
    "lm_head.weight": (F, H),
}

_LAYER_NAME = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
_EXPERT_SUFFIX = re.compile(r"^experts\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorName:
    """A checkpoint tensor name split into its parts.

    ``layer`` is ``None`` for global tensors; ``expert`` is ``None`` outside routed experts;
    ``template`` is the key into :data:`MIXER_TENSORS` (or ``norm.weight`` for the layer norm,
    or the full name for global tensors).
    """

    layer: int | None
    expert: int | None
    template: str
    is_mixer: bool

    def render(self, layer: int | None = None, expert: int | None = None) -> str:
        """Return the on-disk name with the layer and expert indices replaced."""
        if self.layer is None:
            return self.template
        layer = self.layer if layer is None else layer
        if not self.is_mixer:
            return f"backbone.layers.{layer}.{self.template}"
        suffix = self.template
        if self.expert is not None:
            suffix = suffix.replace("{e}", str(self.expert if expert is None else expert))
        return f"backbone.layers.{layer}.mixer.{suffix}"


@functools.lru_cache(maxsize=1 << 16)
def parse_tensor_name(name: str) -> TensorName | None:
    """Split an on-disk tensor name, or return ``None`` if it is not a NemotronH name."""
    if name in GLOBAL_TENSORS:
        return TensorName(layer=None, expert=None, template=name, is_mixer=False)
    match = _LAYER_NAME.match(name)
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if rest == LAYER_NORM_TENSOR[0]:
        return TensorName(layer=layer, expert=None, template=rest, is_mixer=False)
    if not rest.startswith("mixer."):
        return None
    suffix = rest[len("mixer.") :]
    expert_match = _EXPERT_SUFFIX.match(suffix)
    if expert_match is not None:
        template = "experts.{e}." + expert_match.group(2)
        return TensorName(layer=layer, expert=int(expert_match.group(1)), template=template, is_mixer=True)
    return TensorName(layer=layer, expert=None, template=suffix, is_mixer=True)


def natural_key(name: str) -> tuple:
    """Sort key that orders numeric name parts as numbers (``layers.9`` before ``layers.10``)."""
    return tuple(
        (0, int(part), "") if part.isascii() and part.isdigit() and len(part) < 20 else (1, 0, part)
        for part in name.split(".")
    )


@dataclass(frozen=True)
class NemotronHArch:
    """The shape-defining fields of a NemotronH config.

    ``dialect`` is ``"pattern"`` for remote-code configs (``hybrid_override_pattern``) and
    ``"native"`` for transformers configs (``layers_block_type``); configs are written back in the
    dialect they came in.
    """

    dialect: str
    layer_kinds: tuple[LayerKind, ...]
    vocab_size: int
    hidden_size: int
    tie_word_embeddings: bool
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    n_routed_experts: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def mamba_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_rows(self) -> int:
        return 2 * self.mamba_inner + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    def dim_size(self, dim: Dim) -> int | None:
        """Return the full length of a sliceable dimension (``None`` for ``Dim.FULL``)."""
        return self._dim_sizes.get(dim)

    @functools.cached_property
    def _dim_sizes(self) -> dict[Dim, int]:
        return {
            Dim.HIDDEN: self.hidden_size,
            Dim.MAMBA_IN_PROJ: self.mamba_in_proj_rows,
            Dim.MAMBA_CONV: self.mamba_conv_dim,
            Dim.MAMBA_INNER: self.mamba_inner,
            Dim.MAMBA_HEADS: self.mamba_num_heads,
            Dim.ATTENTION_Q: self.num_attention_heads * self.head_dim,
            Dim.FFN: self.intermediate_size,
            Dim.EXPERTS: self.n_routed_experts,
            Dim.EXPERT_FFN: self.moe_intermediate_size,
            Dim.SHARED_FFN: self.shared_expert_intermediate_size,
        }

    def template_shape(self, name: TensorName) -> tuple[int, ...] | None:
        """Return the shape the config implies for a tensor, or ``None`` if it has no template."""
        dims = template_dims(self, name)
        if dims is None:
            return None
        fixed = {
            "k_proj.weight": (self.num_key_value_heads * self.head_dim, self.hidden_size),
            "k_proj.bias": (self.num_key_value_heads * self.head_dim,),
            "v_proj.weight": (self.num_key_value_heads * self.head_dim, self.hidden_size),
            "v_proj.bias": (self.num_key_value_heads * self.head_dim,),
            "conv1d.weight": (self.mamba_conv_dim, 1, self.conv_kernel),
        }
        if name.is_mixer and name.template in fixed:
            return fixed[name.template]
        if name.template in ("backbone.embeddings.weight", "lm_head.weight"):
            return (self.vocab_size, self.hidden_size)
        return tuple(self.dim_size(dim) for dim in dims)  # type: ignore[misc]

    def required_tensors(self) -> list[str]:
        """List the tensor names every checkpoint of this config must contain, in natural order.

        Bias tensors are optional (they exist only when the config enables them) and not listed.
        """
        names = ["backbone.embeddings.weight", "backbone.norm_f.weight"]
        if not self.tie_word_embeddings:
            names.append("lm_head.weight")
        for layer, kind in enumerate(self.layer_kinds):
            names.append(f"backbone.layers.{layer}.norm.weight")
            for template in MIXER_TENSORS[kind]:
                if template.endswith(".bias") and template != "gate.e_score_correction_bias":
                    continue
                if "{e}" not in template:
                    names.append(f"backbone.layers.{layer}.mixer.{template}")
                    continue
                for expert in range(self.n_routed_experts):
                    names.append(f"backbone.layers.{layer}.mixer.{template.replace('{e}', str(expert))}")
        return sorted(names, key=natural_key)


def template_dims(arch: NemotronHArch, name: TensorName) -> tuple[Dim, ...] | None:
    """Return the slicing axis of each dimension of a tensor, or ``None`` if it is unknown."""
    if name.layer is None:
        return GLOBAL_TENSORS.get(name.template)
    if name.layer >= arch.num_layers:
        return None
    if not name.is_mixer:
        return LAYER_NORM_TENSOR[1]
    return MIXER_TENSORS[arch.layer_kinds[name.layer]].get(name.template)


def _field(config: dict[str, Any], *keys: str, default: Any = None, required: bool = True) -> Any:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is not None or not required:
        return default
    raise ConfigError(
        f"config.json has no '{keys[0]}'",
        "a NemotronH config needs it; check that this is a NemotronH checkpoint",
    )


# Far above any real width (Nemotron widths are below 2**18), low enough that masks fit in memory.
MAX_CONFIG_INT = 2**24
MAX_VOCAB = 2**32


def _positive_int(config: dict[str, Any], value: Any, key: str) -> int:
    limit = MAX_VOCAB if key == "vocab_size" else MAX_CONFIG_INT
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise ConfigError(f"config.json field '{key}' is {value!r}", f"it must be a positive integer up to {limit}")
    return value


def read_layer_kinds(config: dict[str, Any]) -> tuple[str, tuple[LayerKind, ...]]:
    """Return the config dialect and the kind of every layer.

    Raises:
        ConfigError: If the pattern, the type list and ``num_hidden_layers`` disagree.
    """
    pattern = config.get("hybrid_override_pattern")
    block_types = config.get("layers_block_type")
    if block_types is None:
        block_types = config.get("layer_types")
    if pattern is None and block_types is None:
        raise ConfigError(
            "config.json has neither 'hybrid_override_pattern' nor 'layers_block_type'",
            "a NemotronH config names the kind of every layer in one of them",
        )

    kinds_from_pattern = None
    if pattern is not None:
        if not isinstance(pattern, str) or any(char not in PATTERN_CHARS for char in pattern):
            raise ConfigError(
                f"config.json 'hybrid_override_pattern' is {pattern!r}",
                "it must contain only the characters M, *, - and E",
            )
        kinds_from_pattern = tuple(PATTERN_CHARS[char] for char in pattern)

    kinds_from_types = None
    if block_types is not None:
        if not isinstance(block_types, list) or any(not isinstance(name, str) or name not in NATIVE_NAMES for name in block_types):
            raise ConfigError(
                f"config.json 'layers_block_type' is {block_types!r}",
                "every entry must be one of linear_attention, full_attention, mlp, moe",
            )
        kinds_from_types = tuple(NATIVE_NAMES[name] for name in block_types)

    if kinds_from_pattern is not None and kinds_from_types is not None and kinds_from_pattern != kinds_from_types:
        raise ConfigError(
            "config.json 'hybrid_override_pattern' and 'layers_block_type' describe different layers",
            "keep one of them, or make them agree",
        )
    dialect = "pattern" if kinds_from_pattern is not None else "native"
    kinds = kinds_from_pattern if kinds_from_pattern is not None else kinds_from_types
    assert kinds is not None

    declared = config.get("num_hidden_layers")
    if declared is not None and declared != len(kinds):
        raise ConfigError(
            f"config.json 'num_hidden_layers' is {declared} but the layer pattern has {len(kinds)} layers",
            "make them agree",
        )
    if not kinds:
        raise ConfigError("config.json describes zero layers", "a NemotronH model needs at least one layer")
    return dialect, kinds


def parse_config(config: dict[str, Any]) -> NemotronHArch:
    """Read the shape-defining fields of a NemotronH ``config.json``.

    Args:
        config: The parsed ``config.json``.

    Returns:
        The architecture as data.

    Raises:
        ConfigError: If a field is missing, of the wrong type, or contradicts another one.
    """
    model_type = config.get("model_type")
    if model_type not in (None, "nemotron_h"):
        raise ConfigError(
            f"config.json 'model_type' is {model_type!r}",
            "elastic handles NemotronH checkpoints (model_type 'nemotron_h')",
        )
    dialect, kinds = read_layer_kinds(config)
    has = set(kinds)

    def need(kind: LayerKind, *keys: str, default: Any = None) -> int:
        if kind not in has:
            value = _field(config, *keys, default=default, required=False)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1
        return _positive_int(config, _field(config, *keys, default=default), keys[0])

    hidden = _positive_int(config, _field(config, "hidden_size"), "hidden_size")
    num_heads = need(LayerKind.ATTENTION, "num_attention_heads")
    head_dim_default = hidden // num_heads if hidden % num_heads == 0 else None
    arch = NemotronHArch(
        dialect=dialect,
        layer_kinds=kinds,
        vocab_size=_positive_int(config, _field(config, "vocab_size"), "vocab_size"),
        hidden_size=hidden,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        mamba_num_heads=need(LayerKind.MAMBA, "mamba_num_heads"),
        mamba_head_dim=need(LayerKind.MAMBA, "mamba_head_dim"),
        n_groups=need(LayerKind.MAMBA, "n_groups", "mamba_n_groups", default=8),
        ssm_state_size=need(LayerKind.MAMBA, "ssm_state_size", default=128),
        conv_kernel=need(LayerKind.MAMBA, "conv_kernel", "mamba_d_conv", default=4),
        num_attention_heads=num_heads,
        num_key_value_heads=need(LayerKind.ATTENTION, "num_key_value_heads", default=num_heads),
        head_dim=need(LayerKind.ATTENTION, "head_dim", default=head_dim_default),
        intermediate_size=need(LayerKind.MLP, "intermediate_size"),
        n_routed_experts=need(LayerKind.MOE, "n_routed_experts", "num_local_experts"),
        moe_intermediate_size=need(LayerKind.MOE, "moe_intermediate_size"),
        shared_expert_intermediate_size=need(LayerKind.MOE, "moe_shared_expert_intermediate_size"),
        num_experts_per_tok=need(LayerKind.MOE, "num_experts_per_tok", default=2),
        n_group=need(LayerKind.MOE, "n_group", default=1),
        topk_group=need(LayerKind.MOE, "topk_group", default=1),
    )
    _check_consistency(arch, config)
    return arch


def _check_consistency(arch: NemotronHArch, config: dict[str, Any]) -> None:
    kinds = set(arch.layer_kinds)
    if LayerKind.MAMBA in kinds and arch.mamba_num_heads % arch.n_groups != 0:
        raise ConfigError(
            f"config.json has mamba_num_heads {arch.mamba_num_heads} and n_groups {arch.n_groups}",
            "Mamba heads must divide evenly into groups",
        )
    if LayerKind.ATTENTION in kinds and arch.num_attention_heads % arch.num_key_value_heads != 0:
        raise ConfigError(
            f"config.json has num_attention_heads {arch.num_attention_heads} and "
            f"num_key_value_heads {arch.num_key_value_heads}",
            "attention heads must be a multiple of KV heads",
        )
    if LayerKind.MOE in kinds:
        if arch.n_routed_experts % arch.n_group != 0:
            raise ConfigError(
                f"config.json has n_routed_experts {arch.n_routed_experts} and n_group {arch.n_group}",
                "experts must divide evenly into routing groups",
            )
        if arch.num_experts_per_tok > arch.n_routed_experts:
            raise ConfigError(
                f"config.json has num_experts_per_tok {arch.num_experts_per_tok} > "
                f"n_routed_experts {arch.n_routed_experts}",
                "top-k cannot exceed the number of experts",
            )
        if config.get("moe_latent_size") is not None:
            raise ConfigError(
                "config.json sets 'moe_latent_size' (latent MoE projections)",
                "elastic does not yet slice latent-MoE NemotronH checkpoints",
            )
    mtp_layers = config.get("num_nextn_predict_layers") or 0
    if mtp_layers:
        raise ConfigError(
            f"config.json sets num_nextn_predict_layers {mtp_layers} (multi-token prediction layers)",
            "elastic does not yet slice checkpoints with MTP layers",
        )
