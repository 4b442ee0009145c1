"""ZeRO-2, the distributed optimizer (``optim.zero=2``): gradients reduce-scattered over dp, AdamW
state and fp32 master weights sharded over dp, updated shards all-gathered into the parameters.

Layout. The dp reducer's persistent gradient buckets (engine/data_parallel.py) are padded to a
multiple of dp, and every parameter's storage is moved into a twin *parameter* bucket with the same
layout. dp rank r owns the r-th 1/dp slice of each bucket, across parameter boundaries (as
Megatron's distributed optimizer does), so every rank's share is equal to within one element per bucket.

One step:
  1. backward: a bucket whose gradients are final is reduce-scattered in place
     (``reduce_scatter_single`` with ``ReduceOp.AVG``: rank r's slice of the bucket receives the dp
     average of that slice),
     overlapped with the rest of backward like the all-reduce of zero=0/1;
  2. the tp and tied-embedding gradient sums act on whole gradients, and a reduce-scatter does not
     commute with them (each rank keeps only its slice): buckets holding such parameters are
     reduce-scattered after those sums (`finish_late`), so they do not overlap backward. With pp > 1
     each copy of the tied embedding gets a bucket of its own (`zero_bucket_key`), so both stages
     cut it at the same flat ranges: the copies' pieces are the same regions on every dp rank,
     counted and saved once;
  3. the global gradient norm is summed in fp32 over the owned slices only (each region once over
     tp and pp replicas), and the fp32 clip factor scales the owned slices;
  4. AdamW (fused on CUDA, foreach elsewhere) steps the owned slice of every parameter: one fp32
     master tensor per (parameter, rank) piece, a view into the rank's master slice;
  5. each rank's updated slice is all-gathered in place into the parameter buckets
     (``all_gather_single``, every bucket in flight at once), which the parameters are views of.

Master weights. With fp32 parameters the master slice *is* the rank's slice of the parameter bucket
(no copy). With bf16 parameters (``precision=bf16``) the model holds bf16 parameters and gradients
and each rank keeps an fp32 copy of its slice only, taken from the fp32 initialization (before the
model is cast), and one persistent fp32 buffer per bucket slice that the reduced bf16 gradients are
copied into for the norm, the clip and AdamW; the update is cast to bf16 before the gather.

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

from engine.buckets import size_buckets
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

    averages = True   # the reduce-scatter averages (ReduceOp.AVG, on NCCL and gloo alike)

    def __init__(self, params: list[nn.Parameter], group, n_micro: int, *, bucket_key=None,
                 bucket_bytes: int = BUCKET_BYTES):
        self._key = bucket_key or zero_bucket_key()
        self.dp_rank = dist.get_rank(group)
        super().__init__(params, group, n_micro, bucket_bytes)
        self.late = {b for b, ps in enumerate(self.buckets) if self._key(ps[0])[2]}

    def _bucket_key(self, p: nn.Parameter) -> tuple:
        return self._key(p)

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
        # in place: the output is the input's own slice at rank × count, as NCCL allows; the
        # collective averages (NCCL and gloo both take ReduceOp.AVG here), no separate division
        return dist.reduce_scatter_single(self.shard_view(b), self.flats[b], op=dist.ReduceOp.AVG, group=self.group,
                                          async_op=True)

    def _averaged(self, b: int) -> torch.Tensor:
        return self.shard_view(b)


def late_params(chunks: list[nn.Module], mesh: Mesh) -> list[nn.Parameter]:
    """The parameters whose gradients are summed over tp or between the tied embedding's copies after
    backward (the latter only with pp > 1: at pp = 1 there is one copy and no sum): their buckets wait
    for those sums (see the module docstring)."""
    out = tp_synced_params(chunks) if mesh.tp > 1 else []
    if mesh.pp > 1 and chunks and chunks[0].cfg.tie_embeddings:
        out += tied_copies(chunks)
    return out


def zero_bucket_key(chunks: list[nn.Module] = (), mesh: Mesh | None = None):
    """ZeRO-2's bucket key of a parameter: (dtype, device, late, alone). ``late``: reduce-scattered
    after the tp / tied sums (`late_params`). ``alone``: with pp > 1, each copy of the tied embedding
    in a bucket of its own, so that it sits at offset 0 with the same padding on both stages and
    every dp rank owns the same flat range of both copies (in a shared late bucket the stages'
    other late parameters, different on each stage, would shift it). Without chunks: every
    parameter early, none alone."""
    late = {id(p) for p in late_params(chunks, mesh)} if chunks else set()
    alone = {id(p) for p in tied_copies(chunks)} if chunks and mesh.pp > 1 and chunks[0].cfg.tie_embeddings else set()

    def key(p: nn.Parameter) -> tuple:
        return p.dtype, p.device, id(p) in late, id(p) if id(p) in alone else None
    return key


def zero_buckets(params: list[nn.Parameter], key, dp: int,
                 bucket_bytes: int = BUCKET_BYTES) -> list[tuple[list[nn.Parameter], int]]:
    """ZeRO-2's buckets as the reducer builds them (reverse parameter order, `size_buckets`), each
    with its padded length; no process group needed (the memory report and the tests use it)."""
    buckets = size_buckets(reversed(params), key=key, nbytes=lambda p: p.numel() * p.element_size(),
                           bucket_bytes=bucket_bytes)
    return [(ps, padded_numel(sum(p.numel() for p in ps), dp)) for _, ps in buckets]


def slice_pieces(numels: list[int], padded: int, dp: int, dp_rank: int) -> list[tuple[int, int, int, int]]:
    """The parts of a bucket's parameters (element counts ``numels``, in bucket order) inside dp rank
    ``dp_rank``'s slice of the ``padded`` bucket: (index, start, stop, flat), elements [start, stop)
    of parameter ``index``'s flattened tensor at ``flat`` in the bucket."""
    lo, hi = dp_rank * padded // dp, (dp_rank + 1) * padded // dp
    out, at = [], 0
    for i, n in enumerate(numels):
        if max(lo, at) < min(hi, at + n):
            out.append((i, max(lo, at) - at, min(hi, at + n) - at, max(lo, at)))
        at += n
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
                 weight_decay, master_init: dict[int, torch.Tensor] | None = None):
        self.refs, self.mesh, self.reducer = refs, mesh, reducer
        ref_of = {id(r.param): r for r in refs}
        self.param_flats: list[torch.Tensor] = []
        self.pieces: list[Piece] = []
        with torch.no_grad():
            for b, (ps, grad_flat) in enumerate(zip(reducer.buckets, reducer.flats)):
                flat = torch.zeros_like(grad_flat)
                at = 0
                for p in ps:   # the parameter's storage moves into the bucket; the Parameter object stays
                    n = p.numel()
                    flat[at:at + n].copy_(p.detach().reshape(-1))
                    p.data = flat[at:at + n].view_as(p)
                    at += n
                for i, start, stop, at in slice_pieces([p.numel() for p in ps], flat.numel(), reducer.size,
                                                      reducer.dp_rank):
                    self.pieces.append(Piece(ref_of[id(ps[i])], b, start, stop, at))
                self.param_flats.append(flat)
        # fp32 parameters: the master slice is the parameter bucket's own slice; else an fp32 copy,
        # from the fp32 initialization where the caller kept it (``master_init``: id(param) -> tensor)
        shards = [f[slice(*reducer.shard(b))] for b, f in enumerate(self.param_flats)]
        self.separate_master = any(s.dtype != torch.float32 for s in shards)
        self.master = [s if s.dtype == torch.float32 else s.float() for s in shards]
        self.shards = shards
        self.master_pieces = [self.master[pc.bucket][pc.flat - reducer.shard(pc.bucket)[0]:][:pc.stop - pc.start]
                              for pc in self.pieces]
        if self.separate_master and master_init:
            with torch.no_grad():
                for pc, m in zip(self.pieces, self.master_pieces):
                    if id(pc.ref.param) in master_init:
                        m.copy_(master_init[id(pc.ref.param)].reshape(-1)[pc.start:pc.stop])
        # the reduced gradients of this rank's slices: the reducer's buckets (fp32), or one persistent
        # fp32 buffer per bucket slice that `_fp32_grads` copies the bf16 slice into once per step
        owned = [reducer.shard_view(b) for b in range(len(reducer.flats))]
        self.owned_grads = owned
        self.grad_slices = [g if g.dtype == torch.float32 else torch.zeros_like(g, dtype=torch.float32) for g in owned]
        self._copy_grads = [(s, g) for s, g in zip(self.grad_slices, owned) if s is not g]
        # each piece's gradient: a persistent view (the buffers never move), attached once
        self.grad_pieces = [self.grad_slices[pc.bucket][pc.flat - reducer.shard(pc.bucket)[0]:][:pc.stop - pc.start]
                            for pc in self.pieces]
        for g, m in zip(self.grad_pieces, self.master_pieces):
            m.grad = g
        decay = [m for pc, m in zip(self.pieces, self.master_pieces) if pc.ref.param.ndim >= 2]
        no_decay = [m for pc, m in zip(self.pieces, self.master_pieces) if pc.ref.param.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.fused = bool(refs) and refs[0].param.device.type == "cuda"
        self.inner = torch.optim.AdamW(groups or [{"params": []}], lr=lr, betas=betas, eps=eps,
                                       **({"fused": True} if self.fused else {"foreach": True}))
        # each global region once over tp replicas and the tied embedding's copies: counts in the
        # gradient norm, and writes optimizer state and master weights. A piece is keyed by its flat
        # range, which is the same on every replica of a parameter (the same buckets on tp ranks; each
        # tied copy alone in its bucket, `zero_bucket_key`); dp ranks hold disjoint ranges
        keys = [(pc.ref.name, pc.ref.meta.offset, pc.ref.meta.shape, pc.start, pc.stop) for pc in self.pieces]
        self.owner = held_lowest(keys)
        seen = set()
        for i, k in enumerate(keys):   # both tied copies on one rank (virtual stages): the first one's pieces
            self.owner[i] = self.owner[i] and k not in seen
            seen.add(k)
        # what the norm reads and the clip scales, as persistent views (boxes without padding rows)
        self._grads_ready = False
        self.norm_views = [g[f:f + math.prod(ext)].view(ext)[meta.local_slices()]
                           for pc, g, own in zip(self.pieces, self.grad_pieces, self.owner) if own
                           for f, meta, ext in pc.boxes()]

    # -- the step ------------------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float, device: torch.device) -> torch.Tensor:
        """`engine.optim.clip_grad_norm` over the owned slices: the same float64 norm on every rank,
        nothing read back to the host."""
        self._fp32_grads()
        grads = self.norm_views
        total = torch.zeros((), dtype=torch.float64, device=device)
        if grads:   # fp32 views: each tensor's norm in fp32, their squares summed in float64
            total += torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double().pow(2).sum()
        dist.all_reduce(total)
        norm = total.sqrt()
        if max_norm and max_norm > 0 and self.grad_slices:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
            torch._foreach_mul_(self.grad_slices, scale)
        return norm

    def _fp32_grads(self) -> None:
        """bf16 parameters: copy the reduced bf16 gradient slices into the fp32 buffers AdamW reads
        (once per step, before the norm; a no-op with fp32 parameters)."""
        if self._copy_grads and not self._grads_ready:
            with torch.no_grad():
                torch._foreach_copy_([s for s, _ in self._copy_grads], [g for _, g in self._copy_grads])
        self._grads_ready = True

    def step(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr
        self._fp32_grads()
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
        and re-attaches; the fp32 gradient buffers of the bf16 case stay (overwritten every step)."""
        for r in self.refs:
            r.param.grad = None
        self._grads_ready = False

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
                       lr, betas, eps, weight_decay, master_init: dict[int, torch.Tensor] | None = None):
    """The dp gradient reducer and the optimizer for ``optim.zero``: 0 (all-reduce, whole state),
    1 (all-reduce, state sharded by parameter), 2 (this module). With dp=1 every mode is zero=0.
    ``master_init``: the fp32 values of parameters already cast to bf16 (id(param) -> tensor), the
    start of ZeRO-2's fp32 master weights."""
    params = [r.param for r in refs]
    if zero == 2 and mesh.dp > 1:
        reducer = ShardedGradReducer(params, mesh.dp_group, n_micro, bucket_key=zero_bucket_key(chunks, mesh))
        return reducer, ShardedOptimizer(refs, mesh, reducer, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                         master_init=master_init)
    reducer = OverlappedGradReducer(params, mesh.dp_group, n_micro)
    return reducer, Optimizer(refs, mesh, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, zero=min(zero, 1))
