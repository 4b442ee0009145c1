"""Cross-entropy over a (possibly vocabulary-sharded) logits tensor, gradient computed in the forward.

The Triton path reads the logits twice and writes them once, and keeps no float32 copy:

1. ``_ce_stats_kernel``: per row, the max and sum of exp over this rank's vocabulary (online, in
   blocks) and the target's logit when this rank owns the target.
2. With ``tp_group`` the per-row max is all-reduced (MAX), then [rescaled sum-exp, target logit]
   (SUM): two small all-reduces of N and 2N floats; the logits are never gathered.
3. ``_ce_grad_kernel``: (softmax - onehot) / n_valid, written in the logits' dtype into the logits'
   own storage when they are an intermediate result (the model's head output), else a new buffer.
   The backward only scales it by the incoming gradient. In place is what keeps the peak memory at
   the logits themselves; the version counter is bumped so that anything else that saved the logits
   for its backward fails loudly in autograd instead of reading gradients.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels._triton import as_rows, check_float, check_launchable, launch, num_warps, tl, triton

MAX_BLOCK = 4096  # vocabulary columns per loop step


class _TorchCrossEntropy(torch.autograd.Function):
    """The plain-torch path's loss, with the gradient computed in the forward as the Triton kernel
    does: one exp pass, no saved log-softmax and no softmax recomputed in backward.

    With ``group``, ``logits`` are this rank's vocabulary shard and three small all-reduces (max,
    sum of exp, target logit; one value per token each) give the full-vocabulary loss without
    gathering the logits (Megatron-LM, ``vocab_parallel_cross_entropy``). Float32 logits that are an
    intermediate result (the head's output) are overwritten with the gradient; anything else is
    copied first. The backward scales a copy, so ``retain_graph`` stays safe.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, group):
        # logits: (..., V_local); targets: (...) global vocabulary ids
        v_local = logits.shape[-1]
        ctx.shape = logits.shape
        targets = targets.reshape(-1)
        tp = dist.get_world_size(group) if group is not None else 1
        start = dist.get_rank(group) * v_local if tp > 1 else 0
        needs_grad = ctx.needs_input_grad[0]
        in_place = (needs_grad and not logits.is_leaf and logits.dtype == torch.float32
                    and logits.is_contiguous())
        # the leaf test is on the caller's tensor: a reshaped view of a leaf is not itself a leaf
        x = logits.view(-1, v_local) if in_place else logits.reshape(-1, v_local).to(torch.float32, copy=True)
        m = x.amax(dim=-1)
        if tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        local_t = targets - start
        owned = (local_t >= 0) & (local_t < v_local) & (targets != ignore_index)
        idx = local_t.clamp(0, v_local - 1)
        tgt = torch.where(owned, x.gather(1, idx[:, None]).squeeze(1) - m, torch.zeros_like(m))
        e = x.sub_(m[:, None]).exp_()
        sum_e = e.sum(-1)
        if tp > 1:
            both = torch.stack([sum_e, tgt])
            dist.all_reduce(both, group=group)
            sum_e, tgt = both[0], both[1]
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        loss = torch.where(valid, sum_e.log() - tgt, torch.zeros_like(tgt)).sum() / n_valid
        if needs_grad:
            # (softmax - onehot) / n_valid for the valid rows, zero for the ignored ones
            grad = e.div_(sum_e[:, None])
            # minus one at each owned target (adding -0.0 elsewhere changes nothing); a scatter,
            # not nonzero(), so the step reads nothing back to the host
            grad.scatter_add_(1, idx[:, None], -owned.to(grad.dtype)[:, None])
            grad.mul_((valid.float() / n_valid)[:, None])
            if in_place:  # the gradient now lives in the logits' own storage (saved as them, not as a view)
                torch.autograd.graph.increment_version(logits)
                grad = logits
            ctx.save_for_backward(grad if grad.dtype == logits.dtype else grad.to(logits.dtype))
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype)).view(ctx.shape), None, None, None


def cross_entropy_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, tp_group=None,
                        check_targets: bool = False):
    """The ``kernels=torch`` loss: mean cross-entropy over non-ignored targets, gradient computed
    in the forward. logits: (..., V or V/tp); targets: (...). Float32 logits that require grad and
    are not a leaf are overwritten with the gradient: do not read them after this call.
    ``check_targets``: as `cross_entropy` (off, the step reads nothing back to the host)."""
    if check_targets:
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        check_target_ids(targets, logits.shape[-1] * tp, ignore_index)
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    return _TorchCrossEntropy.apply(logits, targets, int(ignore_index), tp_group)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, tp_group=None):
    """The plain definition the kernels are checked against: ``F.cross_entropy`` in float32 (with
    ``tp_group``, the vocab-parallel torch path, as torch has no sharded cross-entropy)."""
    logits2 = logits.reshape(-1, logits.shape[-1])
    targets1 = targets.reshape(-1)
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return F.cross_entropy(logits2.float(), targets1, ignore_index=ignore_index)
    return cross_entropy_torch(logits, targets, ignore_index, tp_group)


@triton.jit
def _ce_stats_kernel(X, TARGETS, M, S, TGT, stride_x, V, vocab_start, ignore_index, BLOCK: tl.constexpr):
    """Per row: m = max x, s = sum exp(x - m) over this shard, and x[target] if this shard owns it."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = float("-inf")
    s = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    target = tl.load(TARGETS + row)
    t_local = target - vocab_start
    owned = (t_local >= 0) & (t_local < V) & (target != ignore_index)
    t_logit = tl.load(x_row + t_local, mask=owned, other=0.0).to(tl.float32)
    tl.store(M + row, m)
    tl.store(S + row, s)
    tl.store(TGT + row, tl.where(owned, t_logit, 0.0))


@triton.jit
def _ce_grad_kernel(X, G, TARGETS, LSE, SCALE, stride_x, stride_g, V, vocab_start, BLOCK: tl.constexpr):
    """G = (exp(x - lse) - onehot(target)) * scale, scale = 1/n_valid (0 on ignored rows). G may be X."""
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    t_local = tl.load(TARGETS + row) - vocab_start
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(cols == t_local, p - 1.0, p) * scale
        tl.store(G + row * stride_g + cols, p.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _ce_scale_kernel(G, SCALE, stride_g, V, BLOCK: tl.constexpr):
    """G *= SCALE[0] in float32, one row per program; the factor never goes through the host."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(SCALE)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(G + row * stride_g + cols, (g * scale).to(G.dtype.element_ty), mask=mask)


def scale_rows_(rows: torch.Tensor, scale: torch.Tensor) -> None:
    """rows *= scale[0] in place, in float32; ``scale`` is a one-element float32 device tensor."""
    if rows.numel():
        block = min(triton.next_power_of_2(rows.shape[1]), MAX_BLOCK)
        launch(_ce_scale_kernel, (rows.shape[0],), rows, scale, rows.stride(0), rows.shape[1], BLOCK=block,
               num_warps=num_warps(block))


def _check(logits, targets, ignore_index, tp_group, check_targets):
    op = "cross_entropy"
    check_float(op, "logits", logits)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: targets must be int64 (or int32) class ids, got {targets.dtype}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"{op}: logits {tuple(logits.shape)} must be targets' shape {tuple(targets.shape)} "
                         "plus a trailing vocabulary dim")
    check_launchable(op, logits, targets)
    if check_targets:
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        check_target_ids(targets, logits.shape[-1] * tp, ignore_index)


def check_target_ids(targets: torch.Tensor, vocab: int, ignore_index: int = -100) -> None:
    """Raise if a target is outside [0, vocab) and not ``ignore_index``. This reads a value back to
    the host (a device synchronization), so the training path leaves it to the data loader, which
    checks every window on the host, and runs it only under ``train.check_targets=true``."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.numel() and bool(bad.any()):
        raise ValueError(f"cross_entropy: targets hold ids outside [0, {vocab}) that are not ignore_index={ignore_index}, "
                         f"e.g. {targets[bad][0].item()}; check the tokenizer's vocab against model.vocab_size")


def cross_entropy_forward(logits2, targets1, ignore_index, tp_group, grad_out):
    """Loss (float32 scalar) and, into ``grad_out`` (may be ``logits2``; None: skip), its gradient."""
    n_rows, v = logits2.shape
    dev = logits2.device
    targets1 = targets1.contiguous()  # the kernels read one target per row at unit stride
    m = torch.empty(n_rows, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    tgt = torch.empty_like(m)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    vocab_start = dist.get_rank(tp_group) * v if tp > 1 else 0
    block = min(triton.next_power_of_2(v), MAX_BLOCK)
    if n_rows:
        launch(_ce_stats_kernel, (n_rows,), logits2, targets1, m, s, tgt, logits2.stride(0), v, vocab_start,
               ignore_index, BLOCK=block, num_warps=num_warps(block))
    if tp > 1:
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=tp_group)
        both = torch.stack([s * torch.exp(m - m_global), tgt])  # sum-exp rescaled to the global max
        dist.all_reduce(both, group=tp_group)
        m, s, tgt = m_global, both[0], both[1]
    lse = m + torch.log(s)
    valid = targets1 != ignore_index
    n_valid = valid.sum().clamp(min=1).float()
    loss = torch.where(valid, lse - tgt, torch.zeros_like(lse)).sum() / n_valid
    if grad_out is not None and n_rows:
        scale = valid.float() / n_valid
        launch(_ce_grad_kernel, (n_rows,), logits2, grad_out, targets1, lse, scale, logits2.stride(0),
               grad_out.stride(0), v, vocab_start, BLOCK=block, num_warps=num_warps(block))
    return loss


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, tp_group):
        logits2, targets1 = as_rows(logits), targets.reshape(-1)
        grad = None
        if ctx.needs_input_grad[0]:
            copied = logits2.data_ptr() != logits.data_ptr()  # as_rows made a private copy: reuse it
            in_place = copied or not logits.is_leaf  # a leaf belongs to the caller: leave it intact
            grad = logits2 if in_place else torch.empty(logits2.shape, dtype=logits.dtype, device=logits.device)
            ctx.bump_version = in_place and not copied
        loss = cross_entropy_forward(logits2, targets1, ignore_index, tp_group, grad)
        if grad is not None:
            if ctx.bump_version:  # the gradient now lives in the logits' own storage
                torch.autograd.graph.increment_version(logits)
                grad = logits
            ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, g):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("cross_entropy: a second backward through the Triton cross-entropy (retain_graph): "
                               "its stored gradient was scaled in place by the first; use kernels=torch for that")
        ctx.consumed = True
        grad = ctx.saved_tensors[0].detach()
        # The loss is a scalar, so g is one number (1/micro-batches under accumulation). It is read by
        # the kernel from device memory, never by the host (no synchronization), and applied in float32
        # in place: a bf16 copy of 1/3 would be off by 0.4%, and a logits-sized copy would double the peak.
        rows = as_rows(grad)  # the forward's own rows view: no copy (a copy was made there if needed)
        scale_rows_(rows, g.detach().to(torch.float32).reshape(1))
        return grad.view(ctx.shape), None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, tp_group=None,
                  check_targets: bool = False):
    """Mean cross-entropy over targets != ignore_index (0 when all are ignored); float32 scalar.

    logits: (..., V) or, with ``tp_group``, (..., V / tp) holding vocabulary ids
    [rank * V/tp, (rank + 1) * V/tp); targets: (...) global ids. When ``logits`` require grad and are
    not a leaf, their storage is overwritten with the gradient: do not read them after this call.
    Out-of-range targets are an error only with ``check_targets`` (`check_target_ids`, a device
    synchronization); otherwise they are the caller's contract (the data loader checks its windows).
    """
    _check(logits, targets, ignore_index, tp_group, check_targets)
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    return CrossEntropyFunction.apply(logits, targets, int(ignore_index), tp_group)
