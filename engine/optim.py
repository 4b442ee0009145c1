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

from engine.checkpoint import Entry, held_lowest, optim_key
from engine.mesh import Mesh
from models.shard import ShardMeta, iter_params

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
        self.inner = torch.optim.AdamW(groups or [{"params": []}], lr=lr, betas=betas, eps=eps)
        self.mine = mine

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

    def step(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr
        self.inner.step()
        if self.zero:
            for r, o in zip(self.refs, self.owner_dp):
                dist.broadcast(r.param.data, src=dist.get_global_rank(self.mesh.dp_group, o), group=self.mesh.dp_group)

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
            st["step"] = torch.tensor(float(step))
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = torch.zeros_like(r.param, memory_format=torch.preserve_format)
                out.append(Entry(optim_key(k, r.name), st[k], r.meta))
        return out
