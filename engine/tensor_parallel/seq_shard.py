"""The sequence-sharded layout of sequence parallelism, and saving the shard instead of its gather.

Under sequence parallelism an activation between sub-layers is (B, T/tp, dim) on each rank, rank
order along T. The column-parallel matmuls read the all-gathered (B, T, dim) input; for their
weight gradient they save this rank's shard and all-gather it again in backward (Megatron-LM's
`LinearWithGradAccumulationAndAsyncCommunication`; Korthikanti et al., arXiv:2205.05198): one
re-gather per attention and per MLP, shared by q/k/v (gate/up). See `SeqShard`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

SEQ_DIM = 1  # activations are (B, T, dim); sequence parallelism splits T

# the attribute of an all-gathered tensor naming the shard it came from; set and read only here
_TAG = "_tp_seq_shard"


def all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/tp, ...) on each rank -> (B, T, ...), rank order along T."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, SEQ_DIM).contiguous()  # gather works on dim 0
    if torch.compiler.is_compiling():   # a compiled block (train.compile): the traceable, out-of-place form
        return funcol.all_gather_tensor(xt, 0, group).transpose(0, SEQ_DIM).contiguous()
    out = xt.new_empty((xt.shape[0] * tp, *xt.shape[1:]))
    dist.all_gather_single(out, xt, group=group)
    return out.transpose(0, SEQ_DIM).contiguous()


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, ...) partial sums on each rank -> this rank's (B, T/tp, ...) slice of their sum."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, SEQ_DIM).contiguous()
    if xt.shape[0] % tp:
        raise ValueError(f"sequence length {xt.shape[0]} is not divisible by tp={tp}; with "
                         f"parallel.sequence_parallel=true choose train.seq_len divisible by parallel.tp")
    if torch.compiler.is_compiling():
        return funcol.reduce_scatter_tensor(xt, "sum", 0, group).transpose(0, SEQ_DIM).contiguous()
    out = xt.new_empty((xt.shape[0] // tp, *xt.shape[1:]))
    dist.reduce_scatter_single(out, xt, group=group)
    return out.transpose(0, SEQ_DIM).contiguous()


class SeqShard:
    """The re-gather of one all-gathered input in backward, shared by the matmuls that read it.

    `enter_tp` marks the gathered tensor with its shard (`mark_gathered`). Each matmul that saves it
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
                self.full = all_gather_seq(shard, self.group)
            full = self.full
        self.users -= 1
        if self.users <= 0:
            self.full = None
        return full


def mark_gathered(full: torch.Tensor, shard: torch.Tensor, group) -> None:
    """Record on the all-gathered ``full`` the ``shard`` it was gathered from, with a new `SeqShard`.

    Not inside a compiled block (``train.compile``): the shared re-gather is Python state that
    several autograd Functions' backwards read and update, which a traced graph cannot hold, so
    there the column-parallel matmuls save the gathered input, as without sequence parallelism
    (docs/parallelism.md, "Compiled blocks")."""
    if torch.compiler.is_compiling():
        return
    setattr(full, _TAG, (shard, SeqShard(group)))


def gathered_from(x: torch.Tensor) -> tuple[torch.Tensor, SeqShard] | None:
    """``(shard, SeqShard)`` when ``x`` was marked by `mark_gathered`, else None (always inside a
    compiled block, where nothing is marked: see `mark_gathered`)."""
    if torch.compiler.is_compiling():
        return None
    return getattr(x, _TAG, None)


def save_matmul_input(ctx, x: torch.Tensor) -> torch.Tensor:
    """What an autograd Function computing ``x · Wᵀ`` should save for its weight gradient: ``x``,
    or, when ``x`` is an all-gathered sequence (see `SeqShard`), this rank's shard of it. Pass
    the result to ``ctx.save_for_backward`` and get the input back with `unpack_matmul_input`."""
    tag = gathered_from(x)
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


class LinearSavingShard(torch.autograd.Function):
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
