"""ZeRO-2, the distributed optimizer (``optim.zero=2``): gradients reduce-scattered over dp, AdamW
state and fp32 master weights sharded over dp, updated shards all-gathered into the parameters.

Layout. The dp reducer's persistent gradient buckets (engine/data_parallel.py) are padded to a
multiple of dp, and every parameter's storage is moved into a twin *parameter* bucket with the same
layout. dp rank r owns the r-th 1/dp slice of each bucket, across parameter boundaries (as
Megatron's distributed optimizer does), so every rank's share is equal to within one element per bucket.

One step:
  1. backward: a bucket whose gradients are final is reduce-scattered in place
     (``reduce_scatter_single``: rank r's slice of the bucket receives the dp sum of that slice),
     overlapped with the rest of backward like the all-reduce of zero=0/1;
  2. the tp and tied-embedding gradient sums act on whole gradients, and a reduce-scatter does not
     commute with them (each rank keeps only its slice, and the two copies of the tied embedding sit
     at different offsets of their stages' buckets): buckets holding such parameters are
     reduce-scattered after those sums (`finish_late`), so they do not overlap backward;
  3. the global gradient norm is summed over the owned slices only (each region once over tp and
     pp replicas), and the clip factor scales the owned slices;
  4. AdamW (fused on CUDA, foreach elsewhere) steps the owned slice of every parameter: one fp32
     master tensor per (parameter, rank) piece, a view into the rank's master slice;
  5. each rank's updated slice is all-gathered in place into the parameter buckets
     (``all_gather_single``, every bucket in flight at once), which the parameters are views of.

Master weights. With fp32 parameters the master slice *is* the rank's slice of the parameter bucket
(no copy). With bf16 parameters (``precision=bf16``) the model holds bf16 parameters and gradients
and each rank keeps an fp32 copy of its slice only; the update is cast to bf16 before the gather.

Checkpoints stay layout-independent: a piece of a parameter is a flat range of its row-major local
tensor, which is saved and loaded as at most a few boxes of the global tensor (`flat_boxes`), under
the same global keys as every other layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpoint import Entry, held_lowest, model_key, optim_key
from engine.data_parallel import BUCKET_BYTES, OverlappedGradReducer
from engine.mesh import Mesh
from engine.optim import Optimizer, ParamRef
from engine.pipeline.stages import tied_copies
from engine.tensor_parallel.grad_sync import tp_synced_params
from models.shard import ShardMeta


def padded_numel(numel: int, dp: int) -> int:
    """A bucket's length: its elements rounded up to a multiple of dp (equal slices for every rank)."""
    return -(-numel // dp) * dp


class ShardedGradReducer(OverlappedGradReducer):
    """The dp reducer with each bucket reduce-scattered instead of all-reduced: once `finish` and
    `finish_late` return, dp rank r's slice (`shard`) of every bucket holds the dp average; the rest
    of the bucket holds this rank's own gradients and must not be read."""

    def __init__(self, params: list[nn.Parameter], group, n_micro: int, *, late_params=(),
                 bucket_bytes: int = BUCKET_BYTES):
        self._late_ids = {id(p) for p in late_params}
        self.dp_rank = dist.get_rank(group)
        super().__init__(params, group, n_micro, bucket_bytes)
        self.late = {b for b, ps in enumerate(self.buckets) if id(ps[0]) in self._late_ids}

    def _bucket_key(self, p: nn.Parameter) -> tuple:
        return p.dtype, p.device, id(p) in self._late_ids

    def _flat_numel(self, numel: int) -> int:
        return padded_numel(numel, self.size)

    def shard(self, b: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice of bucket ``b``."""
        n = self.flats[b].numel() // self.size
        return self.dp_rank * n, (self.dp_rank + 1) * n

    def shard_view(self, b: int) -> torch.Tensor:
        lo, hi = self.shard(b)
        return self.flats[b][lo:hi]

    def _reduce(self, b: int) -> dist.Work:
        # in place: the output is the input's own slice at rank × count, as NCCL allows
        return dist.reduce_scatter_single(self.shard_view(b), self.flats[b], group=self.group, async_op=True)

    def _averaged(self, b: int) -> torch.Tensor:
        return self.shard_view(b)


def late_params(chunks: list[nn.Module], mesh: Mesh) -> list[nn.Parameter]:
    """The parameters whose gradients are summed over tp or between the tied embedding's copies after
    backward: their buckets wait for those sums (see the module docstring)."""
    out = tp_synced_params(chunks) if mesh.tp > 1 else []
    if chunks and chunks[0].cfg.tie_embeddings:
        out += tied_copies(chunks)
    return out


def flat_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The flat range [lo, hi) of a row-major tensor of ``shape`` as boxes (offset, extent, flat
    start): a partial first row, whole rows, a partial last row (recursively in the inner dims)."""
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [((lo,) * len(shape), (hi - lo,) * len(shape), lo)]
    inner = math.prod(shape[1:])
    out = []
    row = lo // inner
    if lo % inner:   # a partial first row
        end = min(hi, (row + 1) * inner)
        out += [((row, *o), (1, *e), row * inner + f) for o, e, f in flat_boxes(shape[1:], lo - row * inner,
                                                                               end - row * inner)]
        lo, row = end, row + 1
    full = (hi - lo) // inner
    if full:
        out.append(((row, *[0] * (len(shape) - 1)), (full, *shape[1:]), lo))
        lo, row = lo + full * inner, row + full
    if lo < hi:      # a partial last row
        out += [((row, *o), (1, *e), row * inner + f) for o, e, f in flat_boxes(shape[1:], 0, hi - lo)]
    return out


@dataclass
class Piece:
    """The part of one parameter in this rank's slice of its bucket: elements [start, stop) of the
    parameter's flattened local tensor, at ``flat`` in the bucket."""

    ref: ParamRef
    bucket: int
    start: int
    stop: int
    flat: int

    def boxes(self) -> list[tuple[int, ShardMeta, tuple[int, ...]]]:
        """(offset into the piece, the global region it holds, its extent in the local tensor) for
        each box of the piece that holds real data (padding rows of a tp shard are left out)."""
        meta, shape = self.ref.meta, tuple(self.ref.param.shape)
        out = []
        for off, ext, f in flat_boxes(shape, self.start, self.stop):
            real = tuple(min(o + e, s) - o for o, e, s in zip(off, ext, meta.shape))
            if all(r > 0 for r in real):
                out.append((f - self.start, ShardMeta(meta.global_shape, tuple(mo + o for mo, o in zip(meta.offset, off)),
                                                      real), ext))
        return out


def box_entries(key: str, piece_tensor: torch.Tensor, piece: Piece) -> list[Entry]:
    """Checkpoint entries for a tensor laid out like ``piece`` (its master weights or a moment)."""
    return [Entry(key, piece_tensor[f:f + math.prod(ext)].view(ext), meta) for f, meta, ext in piece.boxes()]


class ShardedOptimizer:
    """AdamW over this dp rank's slices (see the module docstring); the trainer's interface of
    `engine.optim.Optimizer` (step, zero_grad, state_entries, init_state_entries) plus
    `clip_grad_norm` over the owned slices and `master_entries` for checkpoints."""

    sharded_grads = True

    def __init__(self, refs: list[ParamRef], mesh: Mesh, reducer: ShardedGradReducer, *, lr, betas, eps,
                 weight_decay):
        self.refs, self.mesh, self.reducer = refs, mesh, reducer
        ref_of = {id(r.param): r for r in refs}
        self.param_flats: list[torch.Tensor] = []
        self.pieces: list[Piece] = []
        with torch.no_grad():
            for b, (ps, grad_flat) in enumerate(zip(reducer.buckets, reducer.flats)):
                flat = torch.zeros_like(grad_flat)
                lo, hi = reducer.shard(b)
                at = 0
                for p in ps:   # the parameter's storage moves into the bucket; the Parameter object stays
                    n = p.numel()
                    flat[at:at + n].copy_(p.detach().reshape(-1))
                    p.data = flat[at:at + n].view_as(p)
                    if max(lo, at) < min(hi, at + n):
                        self.pieces.append(Piece(ref_of[id(p)], b, max(lo, at) - at, min(hi, at + n) - at, max(lo, at)))
                    at += n
                self.param_flats.append(flat)
        # fp32 parameters: the master slice is the parameter bucket's own slice; else an fp32 copy
        shards = [f[slice(*reducer.shard(b))] for b, f in enumerate(self.param_flats)]
        self.separate_master = any(s.dtype != torch.float32 for s in shards)
        self.master = [s if s.dtype == torch.float32 else s.float() for s in shards]
        self.shards = shards
        self.master_pieces = [self.master[pc.bucket][pc.flat - reducer.shard(pc.bucket)[0]:][:pc.stop - pc.start]
                              for pc in self.pieces]
        # each piece's gradient: a persistent view into its bucket (the reducer's buffers never move)
        self.grad_pieces = [reducer.flats[pc.bucket][pc.flat:pc.flat + pc.stop - pc.start] for pc in self.pieces]
        decay = [m for pc, m in zip(self.pieces, self.master_pieces) if pc.ref.param.ndim >= 2]
        no_decay = [m for pc, m in zip(self.pieces, self.master_pieces) if pc.ref.param.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.fused = bool(refs) and refs[0].param.device.type == "cuda"
        self.inner = torch.optim.AdamW(groups or [{"params": []}], lr=lr, betas=betas, eps=eps,
                                       **({"fused": True} if self.fused else {"foreach": True}))
        # each global region once over tp replicas and the tied embedding's copies (dp ranks hold
        # disjoint pieces): counts in the gradient norm, and writes optimizer state and master weights
        keys = [(pc.ref.name, pc.ref.meta.offset, pc.ref.meta.shape, mesh.dp_rank) for pc in self.pieces]
        self.owner = held_lowest(keys)
        seen = set()
        for i, k in enumerate(keys):   # both tied copies on one rank (virtual stages): the first one's pieces
            self.owner[i] = self.owner[i] and k not in seen
            seen.add(k)
        # what the norm reads and the clip scales, as persistent views (boxes without padding rows)
        self.norm_views = [g[f:f + math.prod(ext)].view(ext)[meta.local_slices()]
                           for pc, g, own in zip(self.pieces, self.grad_pieces, self.owner) if own
                           for f, meta, ext in pc.boxes()]
        self.owned_grads = [reducer.shard_view(b) for b in range(len(reducer.flats))]

    # -- the step ------------------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float, device: torch.device) -> torch.Tensor:
        """`engine.optim.clip_grad_norm` over the owned slices: the same float64 norm on every rank,
        nothing read back to the host."""
        grads = self.norm_views
        total = torch.zeros((), dtype=torch.float64, device=device)
        if grads:
            total += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        dist.all_reduce(total)
        norm = total.sqrt()
        if max_norm and max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            held = self.owned_grads
            for dtype in {g.dtype for g in held}:
                torch._foreach_mul_([g for g in held if g.dtype == dtype], scale.to(dtype))
        return norm

    def step(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr
        for g, m in zip(self.grad_pieces, self.master_pieces):
            if m.grad is not g:   # fp32: the persistent gradient view, set once; bf16: an fp32 copy per step
                m.grad = g if g.dtype == m.dtype else g.float()
        self.inner.step()
        with torch.no_grad():
            if self.separate_master:
                torch._foreach_copy_(self.shards, self.master)
            group = self.mesh.dp_group
            works = [dist.all_gather_single(flat, shard, group=group, async_op=True)
                     for flat, shard in zip(self.param_flats, self.shards)]   # in place, all in flight
            for w in works:
                w.wait()

    def zero_grad(self) -> None:
        """The model's gradients are views into the reducer's buckets, which its own zero_grad zeroes
        and re-attaches; the bf16 case's fp32 copies are dropped."""
        for r in self.refs:
            r.param.grad = None
        if self.separate_master:
            for m in self.master_pieces:
                m.grad = None

    # -- checkpoints ---------------------------------------------------------------------------
    def state_entries(self) -> list[Entry]:
        """The optimizer state this rank writes: its pieces' moments, each region once."""
        out = []
        for pc, m, own in zip(self.pieces, self.master_pieces, self.owner):
            st = self.inner.state.get(m)
            if own and st:
                for k in ("exp_avg", "exp_avg_sq"):
                    out += box_entries(optim_key(k, pc.ref.name), st[k], pc)
        return out

    def init_state_entries(self, step: int) -> list[Entry]:
        """Zeroed state for every piece this rank updates, to be filled from a checkpoint."""
        out = []
        for pc, m in zip(self.pieces, self.master_pieces):
            st = self.inner.state[m]
            st["step"] = torch.tensor(float(step), device=m.device if self.fused else None)
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = torch.zeros_like(m)
                out += box_entries(optim_key(k, pc.ref.name), st[k], pc)
        return out

    def master_entries(self, *, saving: bool) -> list[Entry]:
        """With bf16 parameters, the fp32 master pieces under the model's keys: saved instead of the
        bf16 parameters (each region once), and loaded alongside them. Empty with fp32 parameters."""
        if not self.separate_master:
            return []
        return [e for pc, m, own in zip(self.pieces, self.master_pieces, self.owner) if own or not saving
                for e in box_entries(model_key(pc.ref.name), m, pc)]


def build_dp_optimizer(refs: list[ParamRef], chunks: list[nn.Module], mesh: Mesh, n_micro: int, *, zero: int,
                       lr, betas, eps, weight_decay):
    """The dp gradient reducer and the optimizer for ``optim.zero``: 0 (all-reduce, whole state),
    1 (all-reduce, state sharded by parameter), 2 (this module). With dp=1 every mode is zero=0."""
    params = [r.param for r in refs]
    if zero == 2 and mesh.dp > 1:
        reducer = ShardedGradReducer(params, mesh.dp_group, n_micro, late_params=late_params(chunks, mesh))
        return reducer, ShardedOptimizer(refs, mesh, reducer, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    reducer = OverlappedGradReducer(params, mesh.dp_group, n_micro)
    return reducer, Optimizer(refs, mesh, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, zero=min(zero, 1))
