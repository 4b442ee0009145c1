"""The Megatron mappings between the replicated (or sequence-sharded) activations and a tensor-parallel
region: ``f`` before the column-parallel layers and ``g`` after the row-parallel ones (Shoeybi et al.,
"Megatron-LM", arXiv:1909.08053, figure 3), and their sequence-parallel forms (Korthikanti et al.,
arXiv:2205.05198). The process group is an argument everywhere, never global state.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from engine.tensor_parallel.seq_shard import all_gather_seq, mark_gathered, reduce_scatter_seq


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce a copy of ``x`` (for a tensor that may not be modified); inside a compiled block
    (``train.compile``) the traceable, out-of-place functional all-reduce."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", group)
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _owned(x: torch.Tensor) -> bool:
    """Whether ``g``'s forward may all-reduce its input in place: contiguous, not a view, not a leaf
    requiring grad. The row-parallel partial sum (a matmul's fresh output, which the matmul's backward
    does not save) always is: Megatron-LM reduces it in place too."""
    return x.is_contiguous() and x._base is None and not (x.is_leaf and x.requires_grad)


def _owned_grad(g: torch.Tensor) -> bool:
    """Whether ``f``'s backward may all-reduce the incoming gradient in place: contiguous, and not part
    of a double-backward graph. It is the gradient of the column-parallel layers' input, computed by
    their matmuls' backward (summed when several read the input): a fresh buffer, or a reshaped view
    of one, that nothing else holds — as Megatron-LM assumes when it reduces it in place."""
    return g.is_contiguous() and not g.requires_grad


class CopyToTP(torch.autograd.Function):
    """``f``: identity forward, all-reduce of the input gradient backward (before column-parallel layers)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        if torch.compiler.is_compiling() or not _owned_grad(g):   # compiled: buffers are the compiler's
            return _all_reduce(g, ctx.group), None
        dist.all_reduce(g, group=ctx.group)   # in place: no copy of the (B, T, dim) gradient
        return g, None


class ReduceFromTP(torch.autograd.Function):
    """``g``: all-reduce forward (after row-parallel layers), identity backward. In place when the
    input allows it (`_owned`), declared to autograd with ``mark_dirty``: if anything had saved the
    input for backward, autograd would refuse the modified version with an error, never use it."""

    @staticmethod
    def forward(ctx, x, group):
        if torch.compiler.is_compiling() or not _owned(x):
            return _all_reduce(x, group)
        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class GatherFromSeq(torch.autograd.Function):
    """Sequence-parallel ``f``: all-gather along T forward, reduce-scatter of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_seq(g, ctx.group), None


class ReduceScatterToSeq(torch.autograd.Function):
    """Sequence-parallel ``g``: reduce-scatter along T forward, all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_seq(g, ctx.group), None


def enter_tp(x: torch.Tensor, group, sequence_parallel: bool, *, regather: bool = True) -> torch.Tensor:
    """The input mapping of a column-parallel region (full-sequence, replicated output).

    Under sequence parallelism (and ``regather``) the gathered tensor remembers the shard it came
    from (`SeqShard`), so the column-parallel matmuls reading it save that shard for backward
    instead of the full sequence."""
    if not sequence_parallel:
        return CopyToTP.apply(x, group)
    full = GatherFromSeq.apply(x, group)
    if regather and torch.is_grad_enabled() and full.requires_grad:
        mark_gathered(full, x, group)
    return full


def exit_tp(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The output mapping of a row-parallel region (sums the partial results of the tp ranks)."""
    return ReduceScatterToSeq.apply(x, group) if sequence_parallel else ReduceFromTP.apply(x, group)
