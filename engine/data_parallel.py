"""Data-parallel gradient averaging, overlapped with the backward of the last micro-batch.

The gradients live in persistent flat buckets: at construction each parameter's ``.grad`` becomes a
view into one bucket's buffer (buckets hold parameters of one dtype and device, in reverse
registration order, roughly the order backward finishes them, up to ``bucket_bytes`` each). Backward
accumulates into those views in place, so averaging a bucket is one in-place all-reduce of its
buffer: no per-step concatenation and no copy back. `zero_grad()` zeroes the buffers and re-attaches
any view that was replaced (an optimizer's ``grad = None``).

A parameter's gradient is final once it has been accumulated ``n_micro`` times in a step (each
micro-batch's backward adds to it once, in any executor: serial or any pipeline schedule). A
post-accumulate-grad hook counts; a bucket whose parameters are all final is averaged over dp with
an asynchronous all-reduce while backward goes on. `finish()` sends the buckets a hook never
completed (a gradient written by hand, such as a deferred weight gradient), in a fixed order, and
waits. Replicas run the same graph, so hooks fire in the same order on every dp rank and the
all-reduces line up; correctness never depends on the overlap.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.buckets import size_buckets

BUCKET_BYTES = 25 * 2**20


class OverlappedGradReducer:
    averages = False   # whether `_reduce` averages by itself (ReduceOp.AVG); else `_wait` divides the sum

    def __init__(self, params: list[torch.nn.Parameter], group, n_micro: int, bucket_bytes: int = BUCKET_BYTES):
        self.params = params
        self.group = group
        self.size = dist.get_world_size(group)
        self.n_micro = n_micro
        self.bucket_bytes = bucket_bytes
        self.launched_during_backward = 0  # buckets sent before finish(): the overlap actually achieved
        self.buckets: list[list[torch.nn.Parameter]] = []
        self.flats: list[torch.Tensor] = []
        self.views: list[list[torch.Tensor]] = []   # each parameter's gradient: a view into its bucket
        self.bucket_of: dict[int, int] = {}
        self.late: set[int] = set()   # buckets reduced only in finish_late() (ZeRO-2)
        if self.size > 1:
            self._build_buckets()
            self.zero_grad()
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._reset()

    def _build_buckets(self) -> None:
        buckets = size_buckets(reversed(self.params), key=self._bucket_key, bucket_bytes=self.bucket_bytes,
                               nbytes=lambda p: p.numel() * p.element_size())
        self.buckets = [ps for _, ps in buckets]
        self.bucket_of = {id(p): b for b, ps in enumerate(self.buckets) for p in ps}
        self.flats = [torch.zeros(self._flat_numel(sum(p.numel() for p in ps)), dtype=ps[0].dtype, device=ps[0].device)
                      for ps in self.buckets]
        self.views = [[v.view_as(p) for v, p in zip(flat[:sum(p.numel() for p in ps)].split([p.numel() for p in ps]), ps)]
                      for flat, ps in zip(self.flats, self.buckets)]

    def _bucket_key(self, p: torch.nn.Parameter) -> tuple:
        return p.dtype, p.device

    def _flat_numel(self, numel: int) -> int:
        """A bucket's buffer length for ``numel`` gradient elements (ZeRO-2 pads to a multiple of dp)."""
        return numel

    def zero_grad(self) -> None:
        """Zero every bucket and make each parameter's ``.grad`` its view again (call between steps)."""
        for flat in self.flats:
            flat.zero_()
        for ps, vs in zip(self.buckets, self.views):
            for p, v in zip(ps, vs):
                if p.grad is not v:
                    p.grad = v

    def _reset(self):
        self.counts: dict[int, int] = {}
        self.ready = [0] * len(self.buckets)   # final parameters per bucket
        self.inflight: dict[int, dist.Work] = {}

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if getattr(p, "weight_grad_deferred", False):
            # a zero-bubble deferred weight (engine/pipeline/weight_grad.py): its gradient is added by
            # a W (or a B) outside autograd, which reports it through `on_deferred_grad`. (Eager, no
            # hook fires for it; a compiled block fires one with no gradient.)
            return
        self._count(p)

    def on_deferred_grad(self, p: torch.nn.Parameter) -> None:
        """A deferred weight gradient was added (`WeightGradStore.on_grad`): counted like a hook's, so
        a bucket whose last W has run is sent while the schedule goes on."""
        if self.size > 1 and id(p) in self.bucket_of:
            self._count(p)

    def _count(self, p: torch.nn.Parameter) -> None:
        k = id(p)
        self.counts[k] = self.counts.get(k, 0) + 1
        if self.counts[k] == self.n_micro:
            b = self.bucket_of[k]
            self.ready[b] += 1
            if self.ready[b] == len(self.buckets[b]) and b not in self.late:
                self._launch(b)
                self.launched_during_backward += 1

    def _launch(self, b: int) -> None:
        self._check_views(b)
        self.inflight[b] = self._reduce(b)

    def _reduce(self, b: int) -> dist.Work:
        """Start bucket ``b``'s sum over the group (an all-reduce here; ZeRO-2 reduce-scatters)."""
        return dist.all_reduce(self.flats[b], group=self.group, async_op=True)

    def _averaged(self, b: int) -> torch.Tensor:
        """The part of bucket ``b`` that holds the group's sum once its reduction is done."""
        return self.flats[b]

    def _check_views(self, b: int) -> None:
        for p, v in zip(self.buckets[b], self.views[b]):
            if p.grad is None:
                p.grad = v  # no gradient this step: its zeroed view takes part, as zeros
            elif p.grad is not v:   # replaced by hand since zero_grad(): move it into the bucket
                v.copy_(p.grad)
                p.grad = v

    def finish(self) -> None:
        """Average every gradient over the group; call once per step after all micro-batches."""
        if self.size == 1:
            return
        for b in range(len(self.buckets)):  # in a fixed order, so leftovers line up across ranks
            if b not in self.inflight and b not in self.late:
                self._launch(b)
        self._wait()

    def finish_late(self) -> None:
        """The buckets that must follow the tp and tied-embedding sums: none for an all-reduce, which
        commutes with them; ZeRO-2's reduce-scatter does not (engine/zero.py)."""
        for b in sorted(self.late):
            self._launch(b)
        self._wait()

    def _wait(self) -> None:
        for b, work in self.inflight.items():
            work.wait()
            if not self.averages:
                self._averaged(b).div_(self.size)
        self._reset()
