"""Megatron-style tensor parallelism: the four mappings, the parallel layers, and `parallelize`.

`parallelize(model, mesh, sequence_parallel=...)` shards a plain `models.llama.Llama` (or a stage
of it, on the meta device) in place, so each rank of the tp group holds and computes a 1/tp slice
(Shoeybi et al., "Megatron-LM", arXiv:1909.08053, figure 3; Korthikanti et al., "Reducing
Activation Recomputation", arXiv:2205.05198, for sequence parallelism):

- attention: wq, wk, wv column-parallel by heads, wo row-parallel; MLP: w1 (gate), w3 (up)
  column-parallel, w2 (down) row-parallel. KV heads are split when tp divides ``n_kv_heads``;
  otherwise (tp a multiple of ``n_kv_heads``) each rank holds the one KV head its query heads use,
  and the ranks sharing a KV head add their gradients in `sync_tp_grads`.
- the token embedding and the output head are split by vocabulary, padded to a multiple of tp
  (Megatron's make-vocab-size-divisible-by); padded logits are masked before the loss, which is the
  vocab-parallel cross-entropy of ``kernels`` (logits are never gathered).
- the entry mapping of each sub-layer (``f`` in the paper: identity forward, all-reduce backward;
  or, with sequence parallelism, all-gather forward / reduce-scatter backward) is applied once per
  attention and per MLP by a forward pre-hook, so q, k and v (and gate and up) share it. This keeps
  parameter names untouched and the block at exactly two all-reduces forward and two backward.
- under sequence parallelism the column-parallel matmuls save, for their weight gradient, the
  local sequence shard the all-gather started from, not its full-sequence output, and all-gather
  it again in backward (Megatron-LM's `LinearWithGradAccumulationAndAsyncCommunication`): one
  re-gather per attention and per MLP, shared by q/k/v (gate/up), so the block's backward has four
  all-gathers and two reduce-scatters. See `SeqShard`.

Every sharded parameter gets a `ShardMeta`, so `init_weights` fills it with the serial model's
slice and checkpoints store it under its global name. Process groups are passed in, never global.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.mesh import Mesh
from models.config import ModelConfig
from models.init import ShardMeta, set_shard_meta

SEQ_DIM = 1  # activations are (B, T, dim); sequence parallelism splits T

# -- the mappings ------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)  # never modify a tensor autograd may hold
    dist.all_reduce(x, group=group)
    return x


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/tp, ...) on each rank -> (B, T, ...), rank order along T."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, SEQ_DIM).contiguous()  # gather works on dim 0
    out = xt.new_empty((xt.shape[0] * tp, *xt.shape[1:]))
    dist.all_gather_single(out, xt, group=group)
    return out.transpose(0, SEQ_DIM).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, ...) partial sums on each rank -> this rank's (B, T/tp, ...) slice of their sum."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, SEQ_DIM).contiguous()
    if xt.shape[0] % tp:
        raise ValueError(f"sequence length {xt.shape[0]} is not divisible by tp={tp}; with "
                         f"parallel.sequence_parallel=true choose train.seq_len divisible by parallel.tp")
    out = xt.new_empty((xt.shape[0] // tp, *xt.shape[1:]))
    dist.reduce_scatter_single(out, xt, group=group)
    return out.transpose(0, SEQ_DIM).contiguous()


class CopyToTP(torch.autograd.Function):
    """``f``: identity forward, all-reduce of the input gradient backward (before column-parallel layers)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """``g``: all-reduce forward (after row-parallel layers), identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class GatherFromSeq(torch.autograd.Function):
    """Sequence-parallel ``f``: all-gather along T forward, reduce-scatter of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_seq(g, ctx.group), None


class ReduceScatterToSeq(torch.autograd.Function):
    """Sequence-parallel ``g``: reduce-scatter along T forward, all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_seq(g, ctx.group), None


def enter_tp(x: torch.Tensor, group, sequence_parallel: bool, *, regather: bool = True) -> torch.Tensor:
    """The input mapping of a column-parallel region (full-sequence, replicated output).

    Under sequence parallelism (and ``regather``) the gathered tensor remembers the shard it came
    from (`SeqShard`), so the column-parallel matmuls reading it save that shard for backward
    instead of the full sequence."""
    if not sequence_parallel:
        return CopyToTP.apply(x, group)
    full = GatherFromSeq.apply(x, group)
    if regather and torch.is_grad_enabled() and full.requires_grad:
        full._tp_seq_shard = (x, SeqShard(group))
    return full


def exit_tp(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The output mapping of a row-parallel region (sums the partial results of the tp ranks)."""
    return ReduceScatterToSeq.apply(x, group) if sequence_parallel else ReduceFromTP.apply(x, group)


# -- saving the shard instead of the gathered input (sequence parallelism) --------------------


class SeqShard:
    """The re-gather of one all-gathered input in backward, shared by the matmuls that read it.

    `enter_tp` attaches ``(shard, SeqShard)`` to the gathered tensor. Each matmul that saves it
    for its weight gradient saves the shard instead (`save_matmul_input`) and registers as a user
    while registration is open (the module's forward; `close` ends it, so an activation-checkpoint
    recomputation of the module body, which reuses the same gathered tensor, adds no users). In
    backward the first user to need the input all-gathers the shard (`unpack_matmul_input`); the
    others reuse that tensor; the last user drops it. Every tp rank builds the same graph, so the
    re-gathers run in the same order everywhere. The object lives in the autograd graph of one
    forward, so nothing it caches outlives that graph's backward (or the graph, if never run).
    """

    __slots__ = ("group", "users", "open", "full")

    def __init__(self, group):
        self.group, self.users, self.open, self.full = group, 0, True, None

    def close(self) -> None:
        self.open = False

    def take(self, shard: torch.Tensor | None) -> torch.Tensor | None:
        """The full sequence for one user (``shard=None``: a user that no longer needs it)."""
        full = None
        if shard is not None:
            if self.full is None:
                self.full = _all_gather_seq(shard, self.group)
            full = self.full
        self.users -= 1
        if self.users <= 0:
            self.full = None
        return full


def save_matmul_input(ctx, x: torch.Tensor) -> torch.Tensor:
    """What an autograd Function computing ``x · Wᵀ`` should save for its weight gradient: ``x``,
    or, when ``x`` is an all-gathered sequence (see `SeqShard`), this rank's shard of it. Pass
    the result to ``ctx.save_for_backward`` and get the input back with `unpack_matmul_input`."""
    tag = getattr(x, "_tp_seq_shard", None)
    ctx.tp_seq = None
    if tag is None:
        return x
    shard, seq = tag
    ctx.tp_seq = seq
    if seq.open:
        seq.users += 1
    return shard.detach()


def unpack_matmul_input(ctx, saved: torch.Tensor | None) -> torch.Tensor | None:
    """The matmul's input from what `save_matmul_input` saved (re-gathered if it is a shard);
    ``saved=None`` releases this user's share of the re-gather without gathering."""
    seq = ctx.tp_seq
    if seq is None:
        return saved
    return seq.take(saved)


def linear_weight_grad(g: torch.Tensor, x: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """The weight gradient of ``y = x · Wᵀ``: ``gᵀ · x`` over all leading dims, in the weight's dtype."""
    return g.reshape(-1, g.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight_dtype)


class _LinearSavingShard(torch.autograd.Function):
    """``x · Wᵀ`` on an all-gathered ``x`` that saves the shard of ``x`` for backward."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(save_matmul_input(ctx, x), weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, g):
        saved, weight = ctx.saved_tensors
        grad_x = g.matmul(weight.to(g.dtype)) if ctx.needs_input_grad[0] else None
        x = unpack_matmul_input(ctx, saved if ctx.needs_input_grad[1] else None)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = linear_weight_grad(g, x, weight.dtype)
        return grad_x, grad_w


def _column_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if getattr(x, "_tp_seq_shard", None) is not None and torch.is_grad_enabled():
        return _LinearSavingShard.apply(x, weight)
    return F.linear(x, weight)


# -- the layers --------------------------------------------------------------------------------


def _split(n: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    if n % tp:
        raise ValueError(f"{what} {n} is not divisible by tp={tp}")
    return rank * (n // tp), n // tp


def _empty(shape, like: torch.Tensor | None) -> nn.Parameter:
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return nn.Parameter(torch.empty(shape, **kw))


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ with A split by output rows: this rank holds rows [offset, offset + out_local).

    ``input_is_mapped``: the caller already applied the entry mapping (`enter_tp`) once for several
    layers sharing the input (q/k/v; gate/up); otherwise this layer applies it. The output stays
    split along its last dim. ``rows=(offset, out_local)`` overrides the even split (replicated KV).
    """

    def __init__(self, in_features: int, out_features: int, *, group, sequence_parallel: bool = False,
                 input_is_mapped: bool = False, rows: tuple[int, int] | None = None, like=None):
        super().__init__()
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        offset, local = rows if rows is not None else _split(out_features, tp, rank, "output features")
        self.group, self.sequence_parallel, self.input_is_mapped = group, sequence_parallel, input_is_mapped
        self.weight = _empty((local, in_features), like)
        set_shard_meta(self, "weight", ShardMeta((out_features, in_features), (offset, 0), (local, in_features)))

    def forward(self, x):
        if not self.input_is_mapped:
            x = enter_tp(x, self.group, self.sequence_parallel)
        return self.matmul(x)

    def matmul(self, x):
        """x Aᵀ on the mapped (under sequence parallelism: all-gathered) input: the layer's only use of
        its weight, kept apart from the mappings so the zero-bubble pipeline runtime can swap it per
        instance for one whose weight gradient is deferred to a W action. Under sequence
        parallelism it saves the sequence shard, not ``x`` (`SeqShard`)."""
        return _column_matmul(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_r A_rᵀ with A split by input columns; x arrives split along its last dim.
    The partial sums are all-reduced (reduce-scattered along T under sequence parallelism)."""

    def __init__(self, in_features: int, out_features: int, *, group, sequence_parallel: bool = False, like=None):
        super().__init__()
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        offset, local = _split(in_features, tp, rank, "input features")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _empty((out_features, local), like)
        set_shard_meta(self, "weight", ShardMeta((out_features, in_features), (0, offset), (out_features, local)))

    def forward(self, x):
        return exit_tp(self.matmul(x), self.group, self.sequence_parallel)

    def matmul(self, x):
        """x_r A_rᵀ, this rank's partial sum before the exit mapping (see ColumnParallelLinear.matmul)."""
        return F.linear(x, self.weight)


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so every rank holds an equal shard."""
    return -(-vocab_size // tp) * tp


def vocab_shard(vocab_size: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(first id, local rows, real rows) of ``rank``'s vocabulary shard. Padding rows (local - real)
    sit at the end of the last shard(s); they are not part of the global tensor, stay zero, and
    their logits are masked before the loss."""
    local = padded_vocab(vocab_size, tp) // tp
    start = rank * local
    real = max(0, min(vocab_size - start, local))
    return start, local, real


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows. Each rank looks up the ids it owns (zeros elsewhere) and
    the partial rows are summed over tp (reduce-scattered along T under sequence parallelism)."""

    def __init__(self, vocab_size: int, dim: int, *, group, sequence_parallel: bool = False, like=None):
        super().__init__()
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_local, real = vocab_shard(vocab_size, tp, rank)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _empty((self.vocab_local, dim), like)
        set_shard_meta(self, "weight", ShardMeta((vocab_size, dim), (min(self.vocab_start, vocab_size), 0), (real, dim)))

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside[..., None], 0.0)
        return exit_tp(h, self.group, self.sequence_parallel)


class VocabParallelCrossEntropy(nn.Module):
    """Mean next-token loss from this rank's vocabulary shard of the logits: padded columns are
    masked out, then the kernels' vocab-parallel cross-entropy combines the shards with small
    all-reduces of one value per token."""

    def __init__(self, ops, *, vocab_size: int, group):
        super().__init__()
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.ops, self.group = ops, group
        _, self.vocab_local, self.real = vocab_shard(vocab_size, tp, rank)

    def forward(self, logits, targets):
        if self.real < self.vocab_local:  # padding columns must not enter the softmax
            pad = torch.arange(logits.shape[-1], device=logits.device) >= self.real
            logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        return self.ops.cross_entropy(logits, targets, ignore_index=-100, tp_group=self.group)


# -- parallelize -------------------------------------------------------------------------------


def validate_tp(mcfg: ModelConfig, tp: int, *, seq_len: int | None = None, sequence_parallel: bool = False) -> None:
    """Every reason a model cannot be split over ``tp`` ranks, as one error naming keys and fixes."""
    if tp < 1:
        raise ValueError(f"parallel.tp={tp} must be at least 1")
    problems = []
    if mcfg.n_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide model.n_heads={mcfg.n_heads}")
    if mcfg.ffn_dim % tp:
        problems.append(f"parallel.tp={tp} does not divide model.ffn_dim={mcfg.ffn_dim}")
    if mcfg.n_kv_heads % tp and tp % mcfg.n_kv_heads:
        problems.append(
            f"parallel.tp={tp} neither divides model.n_kv_heads={mcfg.n_kv_heads} (to split the KV heads) nor is "
            f"a multiple of it (to replicate each KV head on tp/n_kv_heads ranks), so some rank's query heads "
            f"would need two KV heads")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        problems.append(f"train.seq_len={seq_len} is not divisible by parallel.tp={tp} "
                        f"(parallel.sequence_parallel=true splits the sequence)")
    if mcfg.vocab_size < tp:
        problems.append(f"model.vocab_size={mcfg.vocab_size} is smaller than parallel.tp={tp}")
    if problems:
        raise ValueError("cannot shard the model over tensor-parallel ranks: " + "; ".join(problems)
                         + "; choose a parallel.tp that divides them (or change the model shape)")


def kv_rows(mcfg: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of wk / wv on ``rank``: a 1/tp split of the KV heads, or, when tp is a
    multiple of n_kv_heads, the single KV head this rank's query heads attend with."""
    hd = mcfg.head_dim
    if mcfg.n_kv_heads % tp == 0:
        per = mcfg.n_kv_heads // tp
        return rank * per * hd, per * hd
    return (rank // (tp // mcfg.n_kv_heads)) * hd, hd


def _mark_grad_sync(module: nn.Module, attr: str, kind: str) -> None:
    """Record that the gradient of ``module.<attr>`` needs summing over tp after backward:
    ``partial`` (each rank saw part of the sequence) or ``kv_replica`` (ranks sharing a KV head)."""
    if not hasattr(module, "tp_grad_sync"):
        module.tp_grad_sync = {}
    module.tp_grad_sync[attr] = kind


def _enter_hook(group, sequence_parallel):
    def hook(module, args):
        # ``sp_regather = False`` (set by `apply_recompute` where a checkpoint keeps or recomputes
        # the gathered input anyway): save the gathered input as before, no re-gather
        regather = getattr(module, "sp_regather", True)
        return (enter_tp(args[0], group, sequence_parallel, regather=regather), *args[1:])
    return hook


def _close_regather_hook(module, args, output):
    """After the module's forward: its matmuls are registered as the re-gather's users."""
    tag = getattr(args[0], "_tp_seq_shard", None) if args else None
    if tag is not None:
        tag[1].close()


def _enter_output_hook(group, sequence_parallel, regather):
    def hook(module, args, output):
        return enter_tp(output, group, sequence_parallel, regather=regather)
    return hook


def parallelize(model: nn.Module, mesh: Mesh, *, sequence_parallel: bool = False) -> nn.Module:
    """Shard a (meta-device) `Llama` or pipeline-stage chunk over ``mesh.tp_group`` in place; see the
    module docstring. Afterwards ``model.logits(h)`` returns this rank's vocabulary shard of the
    logits (padding columns included, zero); ``model(x, y)`` returns the full mean loss on every rank."""
    mcfg: ModelConfig = model.cfg
    tp, rank, group = mesh.tp, mesh.tp_rank, mesh.tp_group
    validate_tp(mcfg, tp)
    if tp == 1:
        return model
    if getattr(model, "tp_size", 1) != 1:
        raise ValueError("this model is already tensor-parallel; call parallelize once, on a plain Llama")
    model.tp_size = tp
    sp = sequence_parallel
    dim, hd = mcfg.dim, mcfg.head_dim
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        like = attn.wq.weight
        attn.wq = ColumnParallelLinear(dim, mcfg.n_heads * hd, group=group, input_is_mapped=True, like=like)
        kv = kv_rows(mcfg, tp, rank)
        attn.wk = ColumnParallelLinear(dim, mcfg.n_kv_heads * hd, group=group, input_is_mapped=True, rows=kv, like=like)
        attn.wv = ColumnParallelLinear(dim, mcfg.n_kv_heads * hd, group=group, input_is_mapped=True, rows=kv, like=like)
        if mcfg.n_kv_heads % tp:
            _mark_grad_sync(attn.wk, "weight", "kv_replica")
            _mark_grad_sync(attn.wv, "weight", "kv_replica")
        attn.wo = RowParallelLinear(mcfg.n_heads * hd, dim, group=group, sequence_parallel=sp, like=like)
        ffn.w1 = ColumnParallelLinear(dim, mcfg.ffn_dim, group=group, input_is_mapped=True, like=like)
        ffn.w3 = ColumnParallelLinear(dim, mcfg.ffn_dim, group=group, input_is_mapped=True, like=like)
        ffn.w2 = RowParallelLinear(mcfg.ffn_dim, dim, group=group, sequence_parallel=sp, like=like)
        for mod in (attn, ffn):
            mod.register_forward_pre_hook(_enter_hook(group, sp))
            if sp:
                mod.register_forward_hook(_close_regather_hook)
        if sp:  # the norms see only this rank's part of the sequence
            _mark_grad_sync(block.attention_norm, "weight", "partial")
            _mark_grad_sync(block.ffn_norm, "weight", "partial")
    if hasattr(model, "tok_embeddings"):
        old = model.tok_embeddings.weight
        model.tok_embeddings = VocabParallelEmbedding(mcfg.vocab_size, dim, group=group, sequence_parallel=sp, like=old)
    if model.is_last:
        # The final norm's output enters the vocab-parallel head (tied or not) through one mapping.
        # The untied head is a ColumnParallelLinear and saves the shard (`SeqShard`); the tied
        # head's plain matmul saves the gathered input, which must then not carry the shard too.
        model.norm.register_forward_hook(_enter_output_hook(group, sp, regather=not mcfg.tie_embeddings))
        if sp:
            _mark_grad_sync(model.norm, "weight", "partial")
        if not mcfg.tie_embeddings:
            start, local, real = vocab_shard(mcfg.vocab_size, tp, rank)
            model.output = ColumnParallelLinear(dim, mcfg.vocab_size, group=group, input_is_mapped=True,
                                                rows=(start, local), like=model.output.weight)
            # the padded rows are local only: the global tensor is (vocab_size, dim)
            set_shard_meta(model.output, "weight",
                           ShardMeta((mcfg.vocab_size, dim), (min(start, mcfg.vocab_size), 0), (real, dim)))
        model.loss_fn = VocabParallelCrossEntropy(model.ops, vocab_size=mcfg.vocab_size, group=group)
    return model


def _sync_params(chunk: nn.Module):
    for module in chunk.modules():
        for attr, kind in getattr(module, "tp_grad_sync", {}).items():
            yield module, getattr(module, attr), kind


def sync_tp_grads(chunks: list[nn.Module], mesh: Mesh) -> None:
    """After backward: sum over tp the gradients each rank holds only a part of.

    - sequence-parallel norm weights: each rank saw T/tp positions; one flat all-reduce for all.
    - replicated KV projections: each rank's gradient covers only its own query heads; every rank
      writes its rows into a zero buffer of the global shape, one all-reduce sums them, and each
      rank takes back its rows (no extra process groups are needed).
    """
    if mesh.tp == 1:
        return
    partial, kv = [], []
    for c in chunks:
        for module, p, kind in _sync_params(c):
            if p.grad is None:
                continue
            (partial if kind == "partial" else kv).append((module, p))
    if partial:
        flat = torch.cat([p.grad.reshape(-1) for _, p in partial])
        dist.all_reduce(flat, group=mesh.tp_group)
        i = 0
        for _, p in partial:
            n = p.grad.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n
    if kv:
        bufs = []
        for module, p in kv:
            meta = module.shard_meta["weight"]
            buf = p.grad.new_zeros(meta.global_shape)
            buf[meta.global_slices()] = p.grad
            bufs.append(buf.reshape(-1))
        flat = torch.cat(bufs)
        dist.all_reduce(flat, group=mesh.tp_group)
        i = 0
        for module, p in kv:
            meta = module.shard_meta["weight"]
            n = int(torch.Size(meta.global_shape).numel())
            p.grad.copy_(flat[i:i + n].view(meta.global_shape)[meta.global_slices()])
            i += n
