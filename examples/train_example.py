"""Train the embedded example: a small elastic NemotronH with three nested budgets, on CPU.

The model has the Nemotron 3 Nano structure (Mamba-2, attention and MoE layers; GQA; grouped
Mamba heads; top-k routed experts plus a shared expert) at a width that fits in a few MB. It
learns English from the docstrings of the Python standard library that elastic ships as its
calibration text (PSF License). Every tenth document is held out and never trained on.

Stages, all in fp32 on CPU:

1. Train a byte-level BPE tokenizer on the training documents.
2. Pretrain the parent with AdamW on random windows of the training text. Experts are balanced
   without an auxiliary loss: after every step each router's ``e_score_correction_bias`` moves
   up for experts that got fewer than their share of tokens and down for the others.
3. Rank components by activation statistics summed over calibration windows (Minitron-style
   importance): |RMSNorm output| per hidden channel, the L2 norm of each Mamba and attention
   head's input to the output projection, |ReLU^2 activation| per FFN channel of every expert
   and of the shared expert, and the routing weight each expert receives. Permute the weights
   into that order, which leaves the model's function unchanged. Every budget's masks then keep
   prefixes (per Mamba group and per KV head for head axes), and all channel counts are
   multiples of 16, as slicing an NVFP4 parent requires.
4. Nested distillation: each step samples one budget (largest first, probabilities
   ``BUDGET_SHAPES``) and trains the shared weights so that budget's logits match the frozen
   pretrained parent's (KL divergence). A budget's forward pass is a real child model of the
   sliced config whose parameters are cut from the parent's by the keep indices of
   ``elastic slice``'s own plan, so it computes exactly what the sliced checkpoint computes.
5. Save the parent in the on-disk NemotronH layout (BF16 weights; FP32 ``A_log``, ``D``,
   router weight and ``e_score_correction_bias``) with the tokenizer and ``elastic_config.json``.
6. Slice every budget with ``elastic slice --budget all`` and report held-out perplexity.

Runs are deterministic for a given seed, torch version, machine type and thread count
(``--threads``, 1 by default).

Usage:
    python examples/train_example.py examples/nano-elastic-tiny             # train, save, evaluate
    python examples/train_example.py --evaluate examples/nano-elastic-tiny  # evaluate only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer, NemotronHConfig

from elastic_cli.arch.nemotron_h import LayerKind, NemotronHArch, parse_config
from elastic_cli.checkpoint.safetensors_io import TensorInfo
from elastic_cli.checkpoint.torch_dtypes import TORCH_TO_DTYPE
from elastic_cli.checkpoint.writer import ShardedWriter, plan_shards, write_text
from elastic_cli.elastic.masks import LAYER_AXES, MASKS_FILE, Axis, Budget, Mask, budgets_to_document
from elastic_cli.elastic.plan import Keep, SlicePlan, build_plan
from elastic_cli.quantize.calib_data import load_texts
from elastic_cli.synthetic import template_shapes, tensor_dtype, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_tokenizer import train_tokenizer  # noqa: E402

log = logging.getLogger("train_example")

SEED = 2026
PATTERN = "MEM*EME"
SIZES = {
    "vocab_size": 2048,
    "hidden_size": 192,
    "mamba_num_heads": 16,
    "mamba_head_dim": 16,
    "n_groups": 4,
    "ssm_state_size": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "moe_shared_expert_intermediate_size": 256,
    "bos_token_id": 1,  # the ids of example_tokenizer's special tokens
    "eos_token_id": 2,
    "pad_token_id": 3,
}
GENERATION_CONFIG = '{\n  "bos_token_id": 1,\n  "eos_token_id": 2,\n  "pad_token_id": 3\n}\n'

HELDOUT_EVERY = 10  # documents 9, 19, 29, ... of the shipped text are held out
SEQ_LEN = 128
BATCH = 8
TRAINING_SAMPLE_WINDOWS = 24  # training windows evaluated next to the held-out ones

PRETRAIN_STEPS = 200
PRETRAIN_LR = 2e-3
WARMUP_STEPS = 20
WEIGHT_DECAY = 0.1
BIAS_UPDATE_RATE = 1e-3  # step of the auxiliary-loss-free expert balancing, per training step

CALIBRATION_WINDOWS = 16
DISTILL_STEPS = 100
DISTILL_LR = 5e-4

MAX_SHARD_BYTES = 50 * 1000**2  # one model.safetensors
# transformers 5.25.0 defaults to torch._grouped_mm, which raises on CPU when a width times the
# dtype size is not a multiple of 16 bytes; the eager loop over experts takes any width.
EXPERTS_IMPLEMENTATION = "eager"


@dataclass(frozen=True)
class BudgetShape:
    """Keep counts of one budget, applied to every layer of the matching kind.

    Attributes:
        probability: How often nested distillation samples this budget.
        hidden: Embedding channels kept.
        mamba_heads_per_group: Mamba heads kept in each of the ``n_groups`` groups.
        heads_per_kv: Query heads kept per KV head.
        experts: Routed experts kept per MoE layer.
        expert_channels: FFN channels kept in every routed expert.
        shared_expert_channels: FFN channels kept in the shared expert.
    """

    probability: float
    hidden: int
    mamba_heads_per_group: int
    heads_per_kv: int
    experts: int
    expert_channels: int
    shared_expert_channels: int


BUDGET_SHAPES = (
    BudgetShape(
        probability=0.5, hidden=192, mamba_heads_per_group=4, heads_per_kv=6,
        experts=8, expert_channels=128, shared_expert_channels=256,
    ),
    BudgetShape(
        probability=0.3, hidden=160, mamba_heads_per_group=3, heads_per_kv=4,
        experts=6, expert_channels=96, shared_expert_channels=192,
    ),
    BudgetShape(
        probability=0.2, hidden=128, mamba_heads_per_group=2, heads_per_kv=2,
        experts=4, expert_channels=64, shared_expert_channels=128,
    ),
)


def example_config() -> dict:
    """Return the parent's ``config.json`` (``hybrid_override_pattern`` dialect)."""
    return tiny_config(PATTERN, **SIZES)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def split_documents(texts: list[str]) -> tuple[list[str], list[str]]:
    """Split documents into training and held-out lists, holding out every ``HELDOUT_EVERY``-th."""
    training = [text for index, text in enumerate(texts) if index % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [text for index, text in enumerate(texts) if index % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return training, heldout


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """Encode documents into one stream of token ids, each document followed by EOS.

    Documents are packed the way ``elastic_cli.quantize.calib_data.tokenize`` packs them.
    """
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: torch.Tensor, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Cut a token stream into consecutive windows, ``[count, seq_len]``, dropping the tail."""
    count = len(stream) // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def heldout_windows(tokenizer) -> torch.Tensor:
    """Return the held-out evaluation windows, ``[count, SEQ_LEN]`` int64."""
    _, heldout = split_documents(load_texts(None))
    return windows(token_stream(heldout, tokenizer))


def training_sample(tokenizer, count: int = TRAINING_SAMPLE_WINDOWS) -> torch.Tensor:
    """Return ``count`` windows spread evenly over the training stream, ``[count, SEQ_LEN]``."""
    training, _ = split_documents(load_texts(None))
    all_windows = windows(token_stream(training, tokenizer))
    return all_windows[:: len(all_windows) // count][:count]


def random_batch(stream: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw ``BATCH`` windows at random offsets of the training stream, ``[BATCH, SEQ_LEN]``."""
    starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=generator)
    return torch.stack([stream[start : start + SEQ_LEN] for start in starts.tolist()])


def mean_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in nats, averaged over every predicted position of every window."""
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(predicted, input_ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def new_model(config: dict) -> torch.nn.Module:
    """Build a randomly initialised fp32 ``NemotronHForCausalLM`` for a ``config.json`` dict."""
    hf_config = NemotronHConfig.from_dict(config)
    return AutoModelForCausalLM.from_config(
        hf_config, dtype=torch.float32, experts_implementation=EXPERTS_IMPLEMENTATION
    )


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids, use_cache=False).logits


def mixers_of(model: torch.nn.Module, kind: LayerKind, arch: NemotronHArch) -> list[tuple[int, torch.nn.Module]]:
    """Return ``(layer index, mixer)`` for every layer of one kind."""
    return [(index, layer.mixer) for index, layer in enumerate(model.model.layers) if arch.layer_kinds[index] is kind]


def window_perplexity(logits_of, token_windows: torch.Tensor, batch: int = 16) -> float:
    """Return a model's perplexity on token windows, each evaluated without earlier context.

    Args:
        logits_of: Function from input ids ``[batch, seq]`` to logits ``[batch, seq, vocab]``.
        token_windows: Token ids, ``[windows, seq]``.
        batch: Windows per forward pass.
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(token_windows), batch):
            input_ids = token_windows[start : start + batch]
            loss = mean_cross_entropy(logits_of(input_ids), input_ids)
            positions = input_ids.shape[0] * (input_ids.shape[1] - 1)
            total += float(loss) * positions
            count += positions
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------
# Stage 2: pretraining
# ---------------------------------------------------------------------------------------------


class ExpertBalancer:
    """Auxiliary-loss-free load balancing of the routed experts.

    Hooks record which experts each router selects in training mode, so evaluation passes do
    not count. :meth:`update` then moves each router's ``e_score_correction_bias`` by ``rate``
    towards equal load, which changes only which experts are selected, never the routing weights.
    """

    def __init__(self, model: torch.nn.Module, arch: NemotronHArch, rate: float) -> None:
        self.rate = rate
        self.routers = [mixer.gate for _, mixer in mixers_of(model, LayerKind.MOE, arch)]
        self.loads = [torch.zeros(router.num_experts) for router in self.routers]
        self.handles = [router.register_forward_hook(self._record(i)) for i, router in enumerate(self.routers)]

    def _record(self, index: int):
        def hook(module, args, output) -> None:
            if not module.training:
                return
            _, _, top_k_indices = output
            self.loads[index] += torch.bincount(top_k_indices.flatten(), minlength=module.num_experts).float()

        return hook

    def update(self) -> None:
        with torch.no_grad():
            for router, load in zip(self.routers, self.loads):
                router.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
                load.zero_()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Return the learning rate: linear warmup over ``WARMUP_STEPS``, then cosine decay to ``peak / 10``."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def new_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Build AdamW with weight decay on matrices only (not on norms, biases or Mamba's A_log, D, dt_bias)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def pretrain(
    model: torch.nn.Module, arch: NemotronHArch, stream: torch.Tensor, heldout: torch.Tensor, steps: int, seed: int
) -> None:
    """Train the parent with next-token cross-entropy on random windows of the training stream."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = new_optimizer(model, PRETRAIN_LR)
    balancer = ExpertBalancer(model, arch, BIAS_UPDATE_RATE)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, PRETRAIN_LR)
        input_ids = random_batch(stream, generator)
        loss = mean_cross_entropy(model_logits(model, input_ids), input_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        balancer.update()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            model.eval()
            perplexity = window_perplexity(lambda ids: model_logits(model, ids), heldout)
            model.train()
            log.info(
                "pretrain step %d/%d: train loss %.3f, held-out perplexity %.1f",
                step + 1, steps, loss.item(), perplexity,
            )
    balancer.remove()
    model.eval()


# ---------------------------------------------------------------------------------------------
# Stage 3: importance ranking and permutation
# ---------------------------------------------------------------------------------------------


@dataclass
class Importance:
    """Activation statistics of every elastic component, summed over calibration tokens.

    Attributes:
        hidden: ``[hidden_size]``, |RMSNorm output| summed over every layer norm and ``norm_f``.
        mamba_heads: Per Mamba layer, ``[mamba_num_heads]``, L2 norm of each head's slice of the
            ``out_proj`` input (the scan output after the gated RMSNorm).
        attention_heads: Per attention layer, ``[num_attention_heads]``, L2 norm of each head's
            slice of the ``o_proj`` input.
        experts: Per MoE layer, ``[n_routed_experts]``, routing weight received.
        expert_channels: Per MoE layer, ``[n_routed_experts, moe_intermediate_size]``, |ReLU^2 activation|.
        shared_expert_channels: Per MoE layer, ``[moe_shared_expert_intermediate_size]``, |ReLU^2 activation|.
    """

    hidden: torch.Tensor
    mamba_heads: dict[int, torch.Tensor]
    attention_heads: dict[int, torch.Tensor]
    experts: dict[int, torch.Tensor]
    expert_channels: dict[int, torch.Tensor]
    shared_expert_channels: dict[int, torch.Tensor]


def head_norms(inputs: torch.Tensor, heads: int) -> torch.Tensor:
    """Return the sum over tokens of each head's L2 norm, for ``inputs`` of ``[..., heads * head_dim]``."""
    per_head = inputs.reshape(-1, heads, inputs.shape[-1] // heads)
    return per_head.norm(dim=-1).sum(dim=0)


def collect_importance(model: torch.nn.Module, arch: NemotronHArch, calibration: torch.Tensor) -> Importance:
    """Run the calibration windows through the model and sum each component's activations."""
    hidden = torch.zeros(arch.hidden_size)
    importance = Importance(hidden, {}, {}, {}, {}, {})
    handles = []

    def add_hidden(module, args, output) -> None:
        importance.hidden.add_(output.detach().abs().reshape(-1, arch.hidden_size).sum(dim=0))

    def add_heads(table: dict[int, torch.Tensor], layer: int, heads: int):
        def hook(module, args) -> None:
            table[layer] = table.get(layer, 0) + head_norms(args[0].detach(), heads)

        return hook

    def add_shared(layer: int):
        def hook(module, args) -> None:
            total = args[0].detach().abs().reshape(-1, args[0].shape[-1]).sum(dim=0)
            importance.shared_expert_channels[layer] = importance.shared_expert_channels.get(layer, 0) + total

        return hook

    def add_experts(layer: int):
        def hook(module, args) -> None:
            tokens, top_k_index, top_k_weights = (arg.detach() for arg in args)
            weights = torch.zeros(module.num_experts)
            channels = torch.zeros(module.num_experts, module.intermediate_dim)
            for expert in range(module.num_experts):
                token_index, position = torch.where(top_k_index == expert)
                weights[expert] = top_k_weights[token_index, position].sum()
                activation = module.act_fn(tokens[token_index] @ module.up_proj[expert].detach().T)
                channels[expert] = activation.abs().sum(dim=0)
            importance.experts[layer] = importance.experts.get(layer, 0) + weights
            importance.expert_channels[layer] = importance.expert_channels.get(layer, 0) + channels

        return hook

    for layer in model.model.layers:
        handles.append(layer.norm.register_forward_hook(add_hidden))
    handles.append(model.model.norm_f.register_forward_hook(add_hidden))
    for index, mixer in mixers_of(model, LayerKind.MAMBA, arch):
        heads = arch.mamba_num_heads
        handles.append(mixer.out_proj.register_forward_pre_hook(add_heads(importance.mamba_heads, index, heads)))
    for index, mixer in mixers_of(model, LayerKind.ATTENTION, arch):
        heads = arch.num_attention_heads
        handles.append(mixer.o_proj.register_forward_pre_hook(add_heads(importance.attention_heads, index, heads)))
    for index, mixer in mixers_of(model, LayerKind.MOE, arch):
        handles.append(mixer.shared_experts.down_proj.register_forward_pre_hook(add_shared(index)))
        handles.append(mixer.experts.register_forward_pre_hook(add_experts(index)))

    with torch.no_grad():
        for start in range(0, len(calibration), BATCH):
            model_logits(model, calibration[start : start + BATCH])
    for handle in handles:
        handle.remove()
    return importance


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Return the indices that sort ``scores`` from most to least important (ties keep their order)."""
    return torch.argsort(scores, descending=True, stable=True)


def grouped_descending(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Sort within each of ``groups`` equal consecutive groups, keeping the groups in place."""
    size = len(scores) // groups
    return torch.cat([group * size + descending(scores[group * size : (group + 1) * size]) for group in range(groups)])


def expand_heads(order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Turn an order of heads into the order of their ``head * head_dim + channel`` rows."""
    return (order[:, None] * head_dim + torch.arange(head_dim)).flatten()


def permute_(tensor: torch.Tensor, dim: int, order: torch.Tensor) -> None:
    """Reorder ``tensor`` along ``dim`` in place: new entry ``i`` is old entry ``order[i]``."""
    tensor.copy_(tensor.index_select(dim, order))


def permute_hidden(model: torch.nn.Module, arch: NemotronHArch, order: torch.Tensor) -> None:
    """Reorder the residual-stream channels of every tensor that reads or writes them."""
    permute_(model.model.embeddings.weight, 1, order)
    permute_(model.lm_head.weight, 1, order)
    permute_(model.model.norm_f.weight, 0, order)
    for index, layer in enumerate(model.model.layers):
        permute_(layer.norm.weight, 0, order)
        mixer, kind = layer.mixer, arch.layer_kinds[index]
        if kind is LayerKind.MAMBA:
            reads, writes = [mixer.in_proj.weight], [mixer.out_proj.weight]
        elif kind is LayerKind.ATTENTION:
            reads, writes = [mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight], [mixer.o_proj.weight]
        elif kind is LayerKind.MOE:
            reads = [mixer.gate.weight, mixer.shared_experts.up_proj.weight]
            writes = [mixer.shared_experts.down_proj.weight]
            permute_(mixer.experts.up_proj, 2, order)  # [experts, channels, hidden]
            permute_(mixer.experts.down_proj, 1, order)  # [experts, hidden, channels]
        else:
            reads, writes = [mixer.up_proj.weight], [mixer.down_proj.weight]
        for weight in reads:
            permute_(weight, 1, order)
        for weight in writes:
            permute_(weight, 0, order)


def permute_mamba_heads(mixer: torch.nn.Module, arch: NemotronHArch, order: torch.Tensor) -> None:
    """Reorder Mamba heads. ``order`` must keep every head inside its group, so B and C stay put."""
    inner = expand_heads(order, arch.mamba_head_dim)
    di, gn = arch.mamba_inner, arch.n_groups * arch.ssm_state_size
    # in_proj rows are z | x | B | C | dt; conv1d channels are x | B | C.
    in_proj_order = torch.cat([inner, di + inner, 2 * di + torch.arange(2 * gn), 2 * di + 2 * gn + order])
    conv_order = torch.cat([inner, di + torch.arange(2 * gn)])
    permute_(mixer.in_proj.weight, 0, in_proj_order)
    permute_(mixer.conv1d.weight, 0, conv_order)
    if mixer.conv1d.bias is not None:
        permute_(mixer.conv1d.bias, 0, conv_order)
    for vector in (mixer.A_log, mixer.D, mixer.dt_bias):
        permute_(vector, 0, order)
    permute_(mixer.norm.weight, 0, inner)
    permute_(mixer.out_proj.weight, 1, inner)


def permute_attention_heads(mixer: torch.nn.Module, arch: NemotronHArch, order: torch.Tensor) -> None:
    """Reorder query heads. ``order`` must keep every head with its KV head."""
    rows = expand_heads(order, arch.head_dim)
    permute_(mixer.q_proj.weight, 0, rows)
    permute_(mixer.o_proj.weight, 1, rows)


def permute_moe(
    mixer: torch.nn.Module, expert_order: torch.Tensor, channel_orders: torch.Tensor, shared_order: torch.Tensor
) -> None:
    """Reorder routed experts, the channels inside each expert and the shared expert's channels.

    ``channel_orders[e]`` is the channel order of the expert that ends up at position ``e``.
    """
    permute_(mixer.gate.weight, 0, expert_order)
    permute_(mixer.gate.e_score_correction_bias, 0, expert_order)
    permute_(mixer.experts.up_proj, 0, expert_order)
    permute_(mixer.experts.down_proj, 0, expert_order)
    for expert, order in enumerate(channel_orders):
        permute_(mixer.experts.up_proj[expert], 0, order)
        permute_(mixer.experts.down_proj[expert], 1, order)
    permute_(mixer.shared_experts.up_proj.weight, 0, shared_order)
    permute_(mixer.shared_experts.down_proj.weight, 1, shared_order)


def sort_by_importance(model: torch.nn.Module, arch: NemotronHArch, importance: Importance) -> None:
    """Permute the model's weights in place so that every axis runs from most to least important."""
    with torch.no_grad():
        permute_hidden(model, arch, descending(importance.hidden))
        for index, mixer in mixers_of(model, LayerKind.MAMBA, arch):
            permute_mamba_heads(mixer, arch, grouped_descending(importance.mamba_heads[index], arch.n_groups))
        for index, mixer in mixers_of(model, LayerKind.ATTENTION, arch):
            order = grouped_descending(importance.attention_heads[index], arch.num_key_value_heads)
            permute_attention_heads(mixer, arch, order)
        for index, mixer in mixers_of(model, LayerKind.MOE, arch):
            expert_order = descending(importance.experts[index])
            channels = importance.expert_channels[index][expert_order]
            channel_orders = torch.stack([descending(scores) for scores in channels])
            permute_moe(mixer, expert_order, channel_orders, descending(importance.shared_expert_channels[index]))


# ---------------------------------------------------------------------------------------------
# Budgets and the nested forward pass
# ---------------------------------------------------------------------------------------------


def prefix(length: int, count: int) -> Mask:
    """Keep-mask of the first ``count`` of ``length`` components."""
    return tuple(index < count for index in range(length))


def grouped_prefix(length: int, groups: int, count: int) -> Mask:
    """Keep-mask of the first ``count`` components of each of ``groups`` equal groups."""
    size = length // groups
    return tuple(index % size < count for index in range(length))


def budget_masks(arch: NemotronHArch, shape: BudgetShape, name: str, target_params: int | None) -> Budget:
    """Build the prefix masks of one budget for an importance-sorted parent."""
    masks = {
        Axis.MAMBA_HEADS: grouped_prefix(arch.mamba_num_heads, arch.n_groups, shape.mamba_heads_per_group),
        Axis.MAMBA_HEAD_CHANNELS: prefix(arch.mamba_head_dim, arch.mamba_head_dim),
        Axis.ATTENTION_HEADS: grouped_prefix(arch.num_attention_heads, arch.num_key_value_heads, shape.heads_per_kv),
        Axis.FFN_CHANNELS: prefix(arch.intermediate_size, arch.intermediate_size),
        Axis.EXPERTS: prefix(arch.n_routed_experts, shape.experts),
        Axis.EXPERT_CHANNELS: prefix(arch.moe_intermediate_size, shape.expert_channels),
        Axis.SHARED_EXPERT_CHANNELS: prefix(arch.shared_expert_intermediate_size, shape.shared_expert_channels),
    }
    layer_masks = tuple(tuple((axis, masks[axis]) for axis in LAYER_AXES[kind]) for kind in arch.layer_kinds)
    hidden = prefix(arch.hidden_size, shape.hidden)
    return Budget(name, target_params, False, hidden, (True,) * arch.num_layers, layer_masks)


def header_infos(arch: NemotronHArch) -> dict[str, TensorInfo]:
    """Header entries of the on-disk tensors, for planning without a file."""
    return {
        name: TensorInfo(Path(), TORCH_TO_DTYPE[tensor_dtype(name)], shape, 0, 0)
        for name, shape in template_shapes(arch).items()
    }


def plan_all(arch: NemotronHArch, config: dict) -> tuple[list[Budget], list[SlicePlan]]:
    """Build the named budgets of ``BUDGET_SHAPES`` and their slice plans, largest first."""
    infos = header_infos(arch)
    budgets, plans = [], []
    for shape in BUDGET_SHAPES:
        params = build_plan(arch, config, infos, budget_masks(arch, shape, "draft", None)).params
        budget = budget_masks(arch, shape, f"{params / 1e6:.1f}M", params)
        budgets.append(budget)
        plans.append(build_plan(arch, config, infos, budget))
    return budgets, plans


ON_DISK_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>up_proj|down_proj)\.weight$")


def in_memory_name(name: str) -> tuple[str, int | None]:
    """Map an on-disk tensor name to transformers' in-memory name and, for experts, the expert index.

    On disk the model lives under ``backbone.`` and every routed expert has its own
    ``experts.{e}.up_proj.weight``. In memory it lives under ``model.``, and the experts of a
    layer share one ``experts.up_proj`` tensor, ``[experts, out, in]``.
    """
    if name.startswith("backbone."):
        name = "model." + name[len("backbone.") :]
    match = ON_DISK_EXPERT.match(name)
    if match is None:
        return name, None
    return f"{match['module']}.{match['projection']}", int(match["expert"])


def cut(tensor: torch.Tensor, keep: tuple[Keep, ...]) -> torch.Tensor:
    """Select the kept entries of every dimension, differentiably. Index ``-1`` inserts zeros."""
    for dim, indices in enumerate(keep):
        if indices is None:
            continue
        index = torch.tensor(indices, dtype=torch.int64)
        tensor = tensor.index_select(dim, index.clamp(min=0))
        if bool((index < 0).any()):
            shape = [1] * tensor.dim()
            shape[dim] = len(indices)
            tensor = tensor * (index >= 0).to(tensor.dtype).view(shape)
    return tensor


class NestedBudget:
    """One budget's forward pass, computed from the parent's live parameters.

    A child ``NemotronHForCausalLM`` of the sliced config runs with parameters cut from the
    parent by the keep indices of ``build_plan``, the plan ``elastic slice`` executes, so
    gradients flow back into the shared parent weights.
    """

    def __init__(self, plan: SlicePlan) -> None:
        self.name = plan.budget
        self.child = new_model(plan.config).eval()
        self.parts: dict[str, list[tuple[str, int | None, tuple[Keep, ...]]]] = {}
        for tensor in plan.tensors:
            source, expert = in_memory_name(tensor.source)
            target, target_expert = in_memory_name(tensor.target)
            self.parts.setdefault(target, []).append((source, expert, tensor.keep))
            if target_expert is not None and target_expert != len(self.parts[target]) - 1:
                raise RuntimeError(f"plan lists expert tensors of {target} out of order")
        expected = {name for name, _ in self.child.named_parameters()}
        expected |= {name for name, _ in self.child.named_buffers()}
        if set(self.parts) != expected:
            raise RuntimeError(f"plan and child disagree on tensors: {sorted(set(self.parts) ^ expected)}")

    def tensors(self, parent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cut the child's parameters and buffers from the parent's (in-memory names)."""
        cut_tensors = {}
        for target, parts in self.parts.items():
            pieces = [
                cut(parent[source] if expert is None else parent[source][expert], keep)
                for source, expert, keep in parts
            ]
            cut_tensors[target] = pieces[0] if parts[0][1] is None else torch.stack(pieces)
        return cut_tensors

    def logits(self, parent_model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        parent = dict(parent_model.named_parameters()) | dict(parent_model.named_buffers())
        return functional_call(self.child, self.tensors(parent), (input_ids,), {"use_cache": False}).logits


# ---------------------------------------------------------------------------------------------
# Stage 4: nested distillation
# ---------------------------------------------------------------------------------------------


def distill(model: torch.nn.Module, nested: list[NestedBudget], stream: torch.Tensor, steps: int, seed: int) -> None:
    """Train the shared weights so that every budget's logits match the frozen parent's.

    Each step samples one budget with the probabilities of ``BUDGET_SHAPES``. The loss is the
    KL divergence from the teacher's next-token distribution, averaged over tokens.
    """
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.tensor([shape.probability for shape in BUDGET_SHAPES])
    optimizer = new_optimizer(model, DISTILL_LR)
    losses: dict[str, list[float]] = {budget.name: [] for budget in nested}
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, DISTILL_LR)
        budget = nested[int(torch.multinomial(probabilities, 1, generator=generator))]
        input_ids = random_batch(stream, generator)
        with torch.no_grad():
            target = F.log_softmax(model_logits(teacher, input_ids).flatten(0, 1), dim=-1)
        student = F.log_softmax(budget.logits(model, input_ids).flatten(0, 1), dim=-1)
        loss = F.kl_div(student, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses[budget.name].append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            recent = ", ".join(
                f"{name} {sum(values[-10:]) / len(values[-10:]):.3f}" for name, values in losses.items() if values
            )
            log.info("distill step %d/%d: KL per budget (last 10 samples) %s", step + 1, steps, recent)
    model.eval()
    for budget in nested:
        log.info("budget %s: %d distillation steps", budget.name, len(losses[budget.name]))


# ---------------------------------------------------------------------------------------------
# Stage 5: saving
# ---------------------------------------------------------------------------------------------


def on_disk_tensors(model: torch.nn.Module, arch: NemotronHArch) -> dict[str, torch.Tensor]:
    """Return every tensor under its on-disk name, in the dtype real checkpoints store it in."""
    state = model.state_dict()
    tensors = {}
    for name in template_shapes(arch):
        source, expert = in_memory_name(name)
        value = state[source] if expert is None else state[source][expert]
        tensors[name] = value.detach().to(tensor_dtype(name)).contiguous()
    return tensors


def save(folder: Path, model: torch.nn.Module, arch: NemotronHArch, config: dict, budgets: list[Budget]) -> None:
    """Write weights, ``config.json``, ``elastic_config.json`` and the generation config into ``folder``."""
    tensors = on_disk_tensors(model, arch)
    entries = [(name, TORCH_TO_DTYPE[tensor.dtype], tuple(tensor.shape)) for name, tensor in tensors.items()]
    with ShardedWriter(folder, plan_shards(entries, MAX_SHARD_BYTES)) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.finish()
    write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text(folder / MASKS_FILE, json.dumps(budgets_to_document(budgets, arch), indent=1, sort_keys=True) + "\n")
    write_text(folder / "generation_config.json", GENERATION_CONFIG)


# ---------------------------------------------------------------------------------------------
# Stage 6: evaluation of the sliced children
# ---------------------------------------------------------------------------------------------


def evaluate(folder: Path) -> dict[str, tuple[float, float]]:
    """Slice every budget with ``elastic slice --budget all`` and measure each child's perplexity.

    Each child is loaded with ``AutoModelForCausalLM`` as stored (BF16 weights) and run in fp32.

    Returns:
        Per budget name, the perplexity on the held-out windows and on a sample of training windows.
    """
    tokenizer = AutoTokenizer.from_pretrained(folder)
    heldout, training = heldout_windows(tokenizer), training_sample(tokenizer)
    budgets = json.loads((folder / MASKS_FILE).read_text(encoding="utf-8"))["budgets"]
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        children = Path(temp) / "children"
        command = [sys.executable, "-m", "elastic_cli", "slice", str(folder), "--budget", "all"]
        command += ["--output", str(children), "-q"]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"elastic slice failed with exit code {completed.returncode}:\n{completed.stderr}")
        for entry in budgets:
            child = AutoModelForCausalLM.from_pretrained(
                children / entry["name"], dtype=torch.float32, experts_implementation=EXPERTS_IMPLEMENTATION
            ).eval()
            results[entry["name"]] = (
                window_perplexity(lambda ids: model_logits(child, ids), heldout),
                window_perplexity(lambda ids: model_logits(child, ids), training),
            )
    log.info(
        "held out: %d windows of %d tokens; training sample: %d windows; uniform perplexity would be %d",
        len(heldout), SEQ_LEN, len(training), tokenizer.vocab_size,
    )
    for name, (heldout_value, training_value) in results.items():
        log.info("budget %s: perplexity %.2f held out, %.2f on training text", name, heldout_value, training_value)
    return results


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def train(folder: Path, pretrain_steps: int, distill_steps: int) -> None:
    """Run every stage and write the example into ``folder`` (replaced if present)."""
    started = time.monotonic()
    torch.manual_seed(SEED)
    config = example_config()
    arch = parse_config(config)
    training_texts, _ = split_documents(load_texts(None))

    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    train_tokenizer(training_texts, config["vocab_size"], staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    stream = token_stream(training_texts, tokenizer)
    heldout = heldout_windows(tokenizer)
    log.info("tokens: %d training, %d held out (%d windows)", len(stream), heldout.numel(), len(heldout))

    model = new_model(config)
    log.info("parent: %d parameters, layers %s", sum(p.numel() for p in model.parameters()), PATTERN)
    pretrain(model, arch, stream, heldout, pretrain_steps, SEED)
    log.info("pretrained in %.0f s", time.monotonic() - started)

    calibration = windows(stream)[:CALIBRATION_WINDOWS]
    probe = heldout[:4]
    with torch.no_grad():
        before = model_logits(model, probe)
        sort_by_importance(model, arch, collect_importance(model, arch, calibration))
        difference = float((model_logits(model, probe) - before).abs().max())
    log.info("sorted by importance; largest logit change %.2e (fp32 rounding)", difference)
    if difference > 1e-3 * float(before.abs().max()):
        raise RuntimeError(f"the importance permutation changed the logits by {difference}")

    budgets, plans = plan_all(arch, config)
    nested = [NestedBudget(plan) for plan in plans]
    for budget in nested:
        perplexity = window_perplexity(lambda ids: budget.logits(model, ids), heldout)
        log.info("budget %s before distillation: held-out perplexity %.2f", budget.name, perplexity)
    distill(model, nested, stream, distill_steps, SEED + 1)
    for budget in nested:
        perplexity = window_perplexity(lambda ids: budget.logits(model, ids), heldout)
        log.info("budget %s after distillation (fp32): held-out perplexity %.2f", budget.name, perplexity)
    log.info("trained in %.0f s", time.monotonic() - started)

    save(staging, model, arch, config, budgets)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    log.info("wrote %s", folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Checkpoint folder to write (replaced) or, with --evaluate, to read.")
    parser.add_argument(
        "--evaluate", action="store_true", help="Only slice the existing checkpoint and report perplexities."
    )
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS, help="Parent training steps.")
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS, help="Nested distillation steps.")
    parser.add_argument(
        "--threads", type=int, default=1, help="Number of CPU threads torch uses. The trained weights depend on it."
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if not args.evaluate:
        train(args.folder, args.pretrain_steps, args.distill_steps)
    evaluate(args.folder)


if __name__ == "__main__":
    main()
