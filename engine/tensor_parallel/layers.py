"""The tensor-parallel layers and `parallelize`, which puts them in place as `plan.PLAN` says.

`parallelize(model, mesh, sequence_parallel=...)` shards a plain `models.llama.Llama` (or a stage
of it, on the meta device) in place, so each rank of the tp group holds and computes a 1/tp slice
(Shoeybi et al., "Megatron-LM", arXiv:1909.08053, figure 3; Korthikanti et al., "Reducing
Activation Recomputation", arXiv:2205.05198, for sequence parallelism). Which module becomes which
layer, which slice each rank holds and where activations enter the region are the plan's
(`engine.tensor_parallel.plan`); this module says how:

- the entry mapping of each sub-layer (``f`` in the paper: identity forward, all-reduce backward;
  or, with sequence parallelism, all-gather forward / reduce-scatter backward) is applied once per
  attention and per MLP by a forward pre-hook, so q, k and v (and gate and up) share it. This keeps
  parameter names untouched and the block at exactly two all-reduces forward and two backward.
- under sequence parallelism the column-parallel matmuls save, for their weight gradient, the
  local sequence shard the all-gather started from, not its full-sequence output, and all-gather
  it again in backward: one re-gather per attention and per MLP, so the block's backward has four
  all-gathers and two reduce-scatters. See `engine.tensor_parallel.seq_shard.SeqShard`.
- padded logits are masked before the loss, which is the vocab-parallel cross-entropy of
  ``kernels`` (logits are never gathered).

Every sharded parameter gets a `ShardMeta`, so `init_weights` fills it with the serial model's
slice and checkpoints store it under its global name. Process groups are passed in, never global.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.mesh import Mesh
from engine.tensor_parallel.mappings import enter_tp, exit_tp
from engine.tensor_parallel.plan import (Entry, Style, TPLayout, TPShard, entry_of, even_shard, param_shard, rule_of,
                                         vocab_rows)
from engine.tensor_parallel.seq_shard import LinearSavingShard, gathered_from
from models.shard import set_shard_meta


def _column_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if gathered_from(x) is not None and torch.is_grad_enabled():
        return LinearSavingShard.apply(x, weight)
    return F.linear(x, weight)


def _group_rank(group) -> tuple[int, int]:
    """(tp, rank) of a layer built on its own, without a shard from the plan."""
    return dist.get_world_size(group), dist.get_rank(group)


def _empty(shape, like: torch.Tensor | None) -> nn.Parameter:
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return nn.Parameter(torch.empty(shape, **kw))


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ with A split by output rows: this rank holds the rows ``shard`` names (by default
    an even 1/tp split; the plan passes the KV-head and vocabulary rules' shards).

    ``input_is_mapped``: the caller already applied the entry mapping (`enter_tp`) once for several
    layers sharing the input (q/k/v; gate/up); otherwise this layer applies it. The output stays
    split along its last dim.
    """

    def __init__(self, in_features: int, out_features: int, *, group, sequence_parallel: bool = False,
                 input_is_mapped: bool = False, shard: TPShard | None = None, like=None):
        super().__init__()
        shard = shard or even_shard((out_features, in_features), 0, *_group_rank(group))
        self.group, self.sequence_parallel, self.input_is_mapped = group, sequence_parallel, input_is_mapped
        self.weight = _empty(shard.local_shape, like)
        set_shard_meta(self, "weight", shard.meta)
        self.weight_grad_store = None  # zero-bubble deferral, as in models.llama.Linear

    def forward(self, x):
        if not self.input_is_mapped:
            x = enter_tp(x, self.group, self.sequence_parallel)
        return self.matmul(x)

    def matmul(self, x):
        """x Aᵀ on the mapped (under sequence parallelism: all-gathered) input: the layer's only use of
        its weight, kept apart from the mappings so that with a ``weight_grad_store`` (zero-bubble
        pipeline) the store computes it and defers the weight gradient to a W action. Under
        sequence parallelism it saves the sequence shard, not ``x`` (`SeqShard`)."""
        if self.weight_grad_store is not None:
            return self.weight_grad_store.matmul(self, x)
        return _column_matmul(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_r A_rᵀ with A split by input columns; x arrives split along its last dim.
    The partial sums are all-reduced (reduce-scattered along T under sequence parallelism)."""

    def __init__(self, in_features: int, out_features: int, *, group, sequence_parallel: bool = False,
                 shard: TPShard | None = None, like=None):
        super().__init__()
        shard = shard or even_shard((out_features, in_features), 1, *_group_rank(group))
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _empty(shard.local_shape, like)
        set_shard_meta(self, "weight", shard.meta)
        self.weight_grad_store = None  # zero-bubble deferral, as in models.llama.Linear

    def forward(self, x):
        return exit_tp(self.matmul(x), self.group, self.sequence_parallel)

    def matmul(self, x):
        """x_r A_rᵀ, this rank's partial sum before the exit mapping (see ColumnParallelLinear.matmul)."""
        if self.weight_grad_store is not None:
            return self.weight_grad_store.matmul(self, x)
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows. Each rank looks up the ids it owns (zeros elsewhere) and
    the partial rows are summed over tp (reduce-scattered along T under sequence parallelism)."""

    def __init__(self, vocab_size: int, dim: int, *, group, sequence_parallel: bool = False,
                 shard: TPShard | None = None, like=None):
        super().__init__()
        shard = shard or vocab_rows((vocab_size, dim), *_group_rank(group))
        self.vocab_size = vocab_size
        # a shard of padding only starts at vocab_size: every id is outside it, as intended
        self.vocab_start, self.vocab_local = shard.meta.offset[0], shard.local_shape[0]
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _empty(shard.local_shape, like)
        set_shard_meta(self, "weight", shard.meta)

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside[..., None], 0.0)
        return exit_tp(h, self.group, self.sequence_parallel)


class VocabParallelCrossEntropy(nn.Module):
    """Mean next-token loss from this rank's vocabulary shard of the logits: padded columns are
    masked out, then the kernels' vocab-parallel cross-entropy combines the shards with small
    all-reduces of one value per token. ``shard``: the output head's (by default from the group)."""

    def __init__(self, ops, *, vocab_size: int, group, shard: TPShard | None = None):
        super().__init__()
        shard = shard or vocab_rows((vocab_size, 1), *_group_rank(group))
        self.ops, self.group = ops, group
        self.vocab_local, self.real = shard.local_shape[0], shard.meta.shape[0]

    def forward(self, logits, targets):
        if self.real < self.vocab_local:  # padding columns must not enter the softmax
            pad = torch.arange(logits.shape[-1], device=logits.device) >= self.real
            logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        return self.ops.cross_entropy(logits, targets, ignore_index=-100, tp_group=self.group)


# -- parallelize -------------------------------------------------------------------------------


def _parallel_module(style: Style, old: nn.Module, shard: TPShard, group, sequence_parallel: bool) -> nn.Module:
    """The parallel layer replacing ``old`` (an ``nn.Linear`` or ``nn.Embedding``) under ``style``."""
    like = old.weight
    if isinstance(old, nn.Embedding):
        return VocabParallelEmbedding(old.num_embeddings, old.embedding_dim, group=group,
                                      sequence_parallel=sequence_parallel, shard=shard, like=like)
    if style is Style.ROW:
        return RowParallelLinear(old.in_features, old.out_features, group=group,
                                 sequence_parallel=sequence_parallel, shard=shard, like=like)
    # column-parallel by rows, KV heads or vocabulary rows; its input is mapped once by its parent
    return ColumnParallelLinear(old.in_features, old.out_features, group=group, input_is_mapped=True,
                                shard=shard, like=like)


def _enter_hook(group, sequence_parallel):
    def hook(module, args):
        # a part running inside an activation checkpoint (its declared recompute mode, see
        # engine.recompute) keeps or recomputes the gathered input anyway: no re-gather
        regather = not module.checkpointed
        return (enter_tp(args[0], group, sequence_parallel, regather=regather), *args[1:])
    return hook


def _close_regather_hook(module, args, output):
    """After the module's forward: its matmuls are registered as the re-gather's users."""
    tag = gathered_from(args[0]) if args else None
    if tag is not None:
        tag[1].close()


def _enter_output_hook(group, sequence_parallel, regather):
    def hook(module, args, output):
        return enter_tp(output, group, sequence_parallel, regather=regather)
    return hook


def parallelize(model: nn.Module, mesh: Mesh, *, sequence_parallel: bool = False) -> nn.Module:
    """Shard a (meta-device) `Llama` or pipeline-stage chunk over ``mesh.tp_group`` in place; see the
    module docstring. Afterwards ``model.logits(h)`` returns this rank's vocabulary shard of the
    logits (padding columns included, zero); ``model(x, y)`` returns the full mean loss on every rank.
    A shape the plan cannot split raises here; `validate_tp` names every such problem at once, and
    the trainer calls it once per launch, before any data or model work."""
    mcfg = model.cfg
    tp, rank, group, sp = mesh.tp, mesh.tp_rank, mesh.tp_group, sequence_parallel
    if tp == 1:
        return model
    if getattr(model, "tp_layout", None) is not None:
        raise ValueError("this model is already tensor-parallel; call parallelize once, on a plain Llama")
    if any(getattr(m, "weight_grad_store", None) is not None for m in model.modules()):
        # the layers parallelize builds would not carry the store: deferral is switched on last
        raise ValueError("weight-gradient deferral is already on; call parallelize before "
                         "enable_weight_grad_deferral (the pipeline runtime does)")
    for name, p in list(model.named_parameters()):
        path = name.rpartition(".")[0]
        rule = rule_of(path)
        if rule is None or rule.style is Style.SEQ_REPLICATED:
            continue
        shard = param_shard(name, p.shape, mcfg, tp, rank)
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, _parallel_module(rule.style, getattr(owner, leaf), shard, group, sp))
    model.tp_layout = TPLayout(tp, rank, sp)
    for path, mod in model.named_modules():
        entry = entry_of(path)
        if entry is Entry.INPUT:
            mod.register_forward_pre_hook(_enter_hook(group, sp))
            if sp:
                mod.register_forward_hook(_close_regather_hook)
        elif entry is Entry.OUTPUT:
            # The final norm's output enters the vocab-parallel head (tied or not) through one mapping.
            # The untied head is a ColumnParallelLinear and saves the shard (`SeqShard`); the tied
            # head's plain matmul saves the gathered input, which must then not carry the shard too.
            mod.register_forward_hook(_enter_output_hook(group, sp, regather=not mcfg.tie_embeddings))
    if model.is_last:
        head = "tok_embeddings.weight" if mcfg.tie_embeddings else "output.weight"
        model.loss_fn = VocabParallelCrossEntropy(model.ops, vocab_size=mcfg.vocab_size, group=group,
                                                  shard=param_shard(head, (mcfg.vocab_size, mcfg.dim), mcfg, tp, rank))
    return model
