"""Optimizer side of a step: global-norm clipping, AdamW
(optionally ZeRO-1: state sharded over dp), and the learning-rate schedule.

Parameters are handled as `ParamRef`s: (global name, local parameter, ShardMeta). A region of a
global tensor held by several ranks (tp-replicated norms, dp replicas, the tied embedding on the
first and last stage) is counted once in the gradient norm, by the lowest rank holding it: the
rank that also writes it to a checkpoint (`engine.layout.lowest_holders`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.buckets import size_buckets
from engine.checkpoint import Entry, held_lowest, optim_key
from engine.mesh import Mesh
from models.shard import ShardMeta, iter_params

BROADCAST_BUCKET_BYTES = 25 * 2**20  # ZeRO-1: parameters per broadcast, as the dp reducer's buckets

@dataclass
class ParamRef:
    name: str
    param: nn.Parameter
    meta: ShardMeta
    norm_owner: bool = True  # counts this region in the global gradient norm


def param_refs(chunks: list[nn.Module]) -> list[ParamRef]:
    """Every parameter this rank holds, over all its model chunks, with global-norm ownership."""
    refs = [ParamRef(n, p, m) for c in chunks for n, p, m in iter_params(c)]
    keys = [(r.name, r.meta.offset, r.meta.shape) for r in refs]
    for r, owner in zip(refs, held_lowest(keys)):
        r.norm_owner = owner
    return refs


def clip_grad_norm(refs: list[ParamRef], max_norm: float, device: torch.device) -> torch.Tensor:
    """Global L2 norm of all gradients over tp × pp × dp, as a float64 tensor on ``device``; scales the
    gradients by min(1, max_norm / (norm + 1e-6)) when ``max_norm`` > 0.

    Nothing here reads a value back to the host: the sum of squares is all-reduced where the
    gradients live (NCCL serves device tensors only) and the clip factor is applied as a tensor."""
    # padding rows never count; one norm per tensor (foreach), their squares summed in float64
    grads = [r.param.grad.detach()[r.meta.local_slices()] for r in refs
             if r.norm_owner and r.param.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=device)
    if grads:
        total += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm and max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        held = [r.param.grad for r in refs if r.param.grad is not None]
        for dtype in {g.dtype for g in held}:  # one foreach per gradient dtype, the factor cast once
            torch._foreach_mul_([g for g in held if g.dtype == dtype], scale.to(dtype))
    return norm


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


class Optimizer:
    """AdamW with fp32 state. With ``zero=1`` each dp rank keeps state for, and updates, only the
    parameters it owns (balanced by size); the owner then broadcasts the new values over dp."""

    def __init__(self, refs: list[ParamRef], mesh: Mesh, *, lr, betas, eps, weight_decay, zero: int = 0):
        self.refs = refs
        self.mesh = mesh
        self.zero = zero and mesh.dp > 1
        self.owner_dp = self._partition(refs, mesh.dp) if self.zero else [mesh.dp_rank] * len(refs)
        mine = [r for r, o in zip(refs, self.owner_dp) if o == mesh.dp_rank]
        decay = [r.param for r in mine if r.param.ndim >= 2]
        no_decay = [r.param for r in mine if r.param.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        # one fused kernel per step on CUDA (its step counters live on the device, so nothing is read
        # back); elsewhere the foreach (multi-tensor) math, not a Python loop over the parameters
        self.fused = bool(refs) and refs[0].param.device.type == "cuda"
        self.inner = torch.optim.AdamW(groups or [{"params": []}], lr=lr, betas=betas, eps=eps,
                                       **({"fused": True} if self.fused else {"foreach": True}))
        self.mine = mine
        self.broadcast_buckets = None  # ZeRO-1's, built at the first step (this needs the process group)

    @staticmethod
    def _partition(refs: list[ParamRef], dp: int) -> list[int]:
        """Greedy largest-first assignment of parameters to dp ranks; deterministic by name."""
        load = [0] * dp
        owner = {}
        for r in sorted(refs, key=lambda r: (-r.param.numel(), r.name)):
            i = min(range(dp), key=lambda k: (load[k], k))
            owner[r.name] = i
            load[i] += r.param.numel()
        return [owner[r.name] for r in refs]

    def _broadcast_buckets(self, bucket_bytes: int = BROADCAST_BUCKET_BYTES) -> list[tuple[int, list[nn.Parameter]]]:
        """ZeRO-1's parameter broadcasts grouped into (owner's global rank, parameters) buckets: one
        owner and one dtype per bucket, up to ``bucket_bytes`` each, in the same order on every dp rank."""
        buckets = size_buckets(zip(self.refs, self.owner_dp), key=lambda ro: (ro[1], ro[0].param.dtype),
                               nbytes=lambda ro: ro[0].param.numel() * ro[0].param.element_size(),
                               bucket_bytes=bucket_bytes)
        return [(dist.get_global_rank(self.mesh.dp_group, owner), [r.param for r, _ in items])
                for (owner, _), items in buckets]

    def step(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr
        self.inner.step()
        if self.zero:   # the owners' new values to every dp rank: one broadcast per bucket, all in flight at once
            if self.broadcast_buckets is None:
                self.broadcast_buckets = self._broadcast_buckets()
            me, group = dist.get_rank(), self.mesh.dp_group
            sent = []
            for src, params in self.broadcast_buckets:
                flat = torch.cat([p.data.reshape(-1) for p in params]) if src == me else torch.empty(
                    sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
                sent.append((dist.broadcast(flat, src=src, group=group, async_op=True), flat, params, src))
            with torch.no_grad():
                for work, flat, params, src in sent:
                    work.wait()
                    if src != me:
                        torch._foreach_copy_([p.data for p in params],
                                             [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)])

    def zero_grad(self) -> None:
        for r in self.refs:
            r.param.grad = None

    def state_entries(self):
        """(key, tensor, meta) for every optimizer-state tensor this rank holds."""
        out = []
        for r in self.mine:
            st = self.inner.state.get(r.param)
            if not st:
                continue
            for k in ("exp_avg", "exp_avg_sq"):
                out.append(Entry(optim_key(k, r.name), st[k], r.meta))
        return out

    def init_state_entries(self, step: int):
        """Create zeroed state for this rank's parameters (to be filled from a checkpoint)."""
        out = []
        for r in self.mine:
            st = self.inner.state[r.param]
            # where AdamW itself keeps it: on the parameter's device (float32) when fused, else the CPU
            st["step"] = torch.tensor(float(step), device=r.param.device if self.fused else None)
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = torch.zeros_like(r.param, memory_format=torch.preserve_format)
                out.append(Entry(optim_key(k, r.name), st[k], r.meta))
        return out
