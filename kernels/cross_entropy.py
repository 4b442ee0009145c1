"""Cross-entropy over a (possibly vocabulary-sharded) logits tensor."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Loss over the full vocabulary from this rank's vocabulary shard of the logits.

    Three small all-reduces over ``group`` (max, sum of exp, target logit), each of one value
    per token; the logits themselves are never gathered (Megatron-LM, ``vocab_parallel_cross_entropy``).
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, group):
        # logits: (N, V_local); targets: (N,) global vocabulary ids
        v_local = logits.shape[-1]
        start = dist.get_rank(group) * v_local
        x = logits.float()
        m = x.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        x = x - m[:, None]
        local_t = targets - start
        owned = (local_t >= 0) & (local_t < v_local) & (targets != ignore_index)
        idx = local_t.clamp(0, v_local - 1)
        tgt = torch.where(owned, x.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(m))
        e = x.exp()
        sum_e = e.sum(-1)
        both = torch.stack([sum_e, tgt])
        dist.all_reduce(both, group=group)
        sum_e, tgt = both[0], both[1]
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        loss = torch.where(valid, sum_e.log() - tgt, torch.zeros_like(tgt)).sum() / n_valid
        # softmax - onehot, computed now so no fp32 logits copy is kept beyond this one
        grad = e.div_(sum_e[:, None])
        grad[owned.nonzero().squeeze(1), idx[owned]] -= 1.0
        grad.mul_((valid.float() / n_valid)[:, None])
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.dtype), None, None, None


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, tp_group=None):
    """Mean cross-entropy over non-ignored targets. logits: (..., V or V/tp); targets: (...)."""
    logits2 = logits.reshape(-1, logits.shape[-1])
    targets1 = targets.reshape(-1)
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return F.cross_entropy(logits2.float(), targets1, ignore_index=ignore_index)
    return _VocabParallelCrossEntropy.apply(logits2, targets1, ignore_index, tp_group)
