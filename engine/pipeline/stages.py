"""Cutting the model into pipeline stages, and combining the tied embedding's two copies.

Stage s (global virtual-stage index, 0..pp*v-1) holds a contiguous range of layers and lives on
pp rank s % pp as that rank's chunk s // pp (round-robin, so the interleaved schedule's
micro-batches visit every rank v times).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.layout import check_end_only_empty, even_split, rank_stages, stage_bounds, stage_rank
from engine.mesh import Mesh
from models import Llama, ModelConfig


def stage_layer_ranges(n_layers: int, pp: int, virtual_stages: int = 1,
                       layers_per_stage: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(start, stop) of every stage's layers. Default: an even split, earlier stages taking the
    remainder (the last stage also carries the output head and the loss). Given counts may leave
    the first stage (embedding only) and the last (norm, head and loss only) without layers."""
    n_stages = pp * virtual_stages
    if layers_per_stage is not None:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != n_stages:
            raise ValueError(f"parallel.layers_per_stage has {len(counts)} entries but the pipeline has "
                             f"pp={pp} × virtual_stages={virtual_stages} = {n_stages} stages; give one count per stage")
        if sum(counts) != n_layers:
            raise ValueError(f"parallel.layers_per_stage={counts} sums to {sum(counts)}, not the model's "
                             f"n_layers={n_layers}; make the counts add up to {n_layers}")
        check_end_only_empty(counts, "parallel.layers_per_stage")
    else:
        if n_stages > n_layers:
            raise ValueError(f"the pipeline has pp={pp} × virtual_stages={virtual_stages} = {n_stages} stages but the "
                             f"model has only {n_layers} layers; use at most {n_layers} stages")
        if virtual_stages > 1 and n_layers % n_stages:
            raise ValueError(f"n_layers={n_layers} does not divide into pp={pp} × virtual_stages={virtual_stages} = "
                             f"{n_stages} equal chunks; change parallel.virtual_stages or set parallel.layers_per_stage")
        counts = even_split(n_layers, n_stages)
    return stage_bounds(counts)


def build_stage_chunks(mcfg: ModelConfig, mesh: Mesh, *, layers_per_stage: Sequence[int] | None = None,
                       virtual_stages: int = 1, kernels: str = "torch") -> list[Llama]:
    """This pp rank's model chunks on the meta device, in local chunk order (`engine.layout.rank_stages`
    under the mesh's placement: stage c*pp + pp_rank for the loop, stages r and 2pp-1-r for the V)."""
    ranges = stage_layer_ranges(mcfg.n_layers, mesh.pp, virtual_stages, layers_per_stage)
    with torch.device("meta"):
        return [stage_model(mcfg, ranges, s, kernels)
                for s in rank_stages(mesh.pp_rank, mesh.pp, virtual_stages, mesh.pp_placement)]


def last_stage_rank(mesh: Mesh) -> int:
    """The pp rank holding the last stage (the head): pp-1, or 0 under the V placement."""
    return stage_rank(2 * mesh.pp - 1, mesh.pp, "v") if mesh.pp_placement == "v" else mesh.pp - 1


def stage_model(mcfg: ModelConfig, ranges: Sequence[tuple[int, int]], stage: int, kernels: str = "torch") -> Llama:
    """Global stage ``stage``'s piece of the model: its layers, the embedding if it is stage 0 and
    the norm, head and loss if it is the last. The ends go by the stage index, not the layer range:
    next to an empty first stage (0, 0) the second stage starts at layer 0 too (and next to an
    empty last stage the one before stops at the last layer) and must not take the embedding (head)."""
    return Llama(mcfg, layers=ranges[stage], kernels=kernels, first=stage == 0, last=stage == len(ranges) - 1)


def tied_copies(chunks: Sequence[nn.Module]) -> list[nn.Parameter]:
    """This rank's copies of the tied embedding (none, one, or both ends of the pipeline)."""
    return [c.tok_embeddings.weight for c in chunks if hasattr(c, "tok_embeddings")]


@torch.no_grad()
def sync_tied_grads(chunks: Sequence[nn.Module], mesh: Mesh) -> None:
    """With tied embeddings the first stage (embedding) and the last stage (head) each hold a copy
    of ``tok_embeddings.weight``; both copies must step with the sum of their gradients, as the
    one shared tensor does in the serial model. One exchange between pp ranks 0 and pp-1 (same
    dp and tp coordinates); a no-op without tied embeddings or on the other ranks."""
    if not chunks or not chunks[0].cfg.tie_embeddings:
        return
    copies = tied_copies(chunks)
    for p in copies:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if len(copies) == 2:           # first and last stage on one rank (pp == 1, or rank 0 of a V)
        total = copies[0].grad + copies[1].grad
        for p in copies:
            p.grad.copy_(total)
        return
    if mesh.pp == 1 or not copies:
        return
    (mine,) = copies
    peer = mesh.pp_global_rank(last_stage_rank(mesh) if mesh.is_first_stage else 0)
    theirs = torch.empty_like(mine.grad)
    ops = [dist.P2POp(dist.isend, mine.grad, peer), dist.P2POp(dist.irecv, theirs, peer)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    mine.grad.add_(theirs)
