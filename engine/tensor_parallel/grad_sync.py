"""Summing over tp the gradients each rank holds only a part of, as the plan says (`GradSync`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.mesh import Mesh
from engine.tensor_parallel.plan import GradSync, TPShard, param_shard
from models.shard import shard_meta


def _to_sync(chunk: nn.Module, *, with_grad: bool = True):
    """(parameter, its `TPShard`) for every parameter of ``chunk`` (with a gradient, by default)
    whose gradient the plan syncs."""
    layout = chunk.tp_layout
    for name, p in chunk.named_parameters():
        if with_grad and p.grad is None:
            continue
        shard = param_shard(name, shard_meta(chunk, name).global_shape, chunk.cfg, layout.tp, layout.tp_rank,
                            sequence_parallel=layout.sequence_parallel)
        if shard.grad_sync is not None:
            yield p, shard


def tp_synced_params(chunks: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters whose gradients `sync_tp_grads` sums over tp."""
    return [p for c in chunks for p, _ in _to_sync(c, with_grad=False)]


def sync_tp_grads(chunks: list[nn.Module], mesh: Mesh) -> None:
    """After backward: sum over tp the gradients each rank holds only a part of.

    - sequence-parallel norm weights: each rank saw T/tp positions; one flat all-reduce for all.
    - replicated KV projections: each rank's gradient covers only its own query heads; every rank
      writes its rows into a zero buffer of the global shape, one all-reduce sums them, and each
      rank takes back its rows (no extra process groups are needed).
    """
    if mesh.tp == 1:
        return
    partial: list[nn.Parameter] = []
    kv: list[tuple[nn.Parameter, TPShard]] = []
    for c in chunks:
        for p, shard in _to_sync(c):
            if shard.grad_sync is GradSync.PARTIAL:
                partial.append(p)
            else:
                kv.append((p, shard))
    if partial:
        flat = torch.cat([p.grad.reshape(-1) for p in partial])
        dist.all_reduce(flat, group=mesh.tp_group)
        i = 0
        for p in partial:
            n = p.grad.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n
    if kv:
        bufs = []
        for p, shard in kv:
            buf = p.grad.new_zeros(shard.meta.global_shape)
            buf[shard.meta.global_slices()] = p.grad
            bufs.append(buf.reshape(-1))
        flat = torch.cat(bufs)
        dist.all_reduce(flat, group=mesh.tp_group)
        i = 0
        for p, shard in kv:
            meta = shard.meta
            n = int(torch.Size(meta.global_shape).numel())
            p.grad.copy_(flat[i:i + n].view(meta.global_shape)[meta.global_slices()])
            i += n
