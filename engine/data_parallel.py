"""Data-parallel gradient averaging, overlapped with the backward of the last micro-batch.

A parameter's gradient is final once it has been accumulated ``n_micro`` times in a step (each
micro-batch's backward adds to it once, in any executor: serial or any pipeline schedule). A
post-accumulate-grad hook counts; final gradients join a bucket, and a full bucket is averaged
over dp with an asynchronous all-reduce while backward goes on. `finish()` flushes the last
bucket, waits, and copies the averages back. Replicas run the same graph, so hooks fire in the
same order on every dp rank and buckets line up; anything a hook never saw (a gradient written
by hand) is averaged at `finish()`, so correctness never depends on the overlap.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20


class OverlappedGradReducer:
    def __init__(self, params: list[torch.nn.Parameter], group, n_micro: int, bucket_bytes: int = BUCKET_BYTES):
        self.params = params
        self.group = group
        self.size = dist.get_world_size(group)
        self.n_micro = n_micro
        self.bucket_bytes = bucket_bytes
        self.launched_during_backward = 0  # buckets sent before finish(): the overlap actually achieved
        self._reset()
        if self.size > 1:
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _reset(self):
        self.counts: dict[int, int] = {}
        self.done: set[int] = set()
        self.bucket: list[torch.nn.Parameter] = []
        self.bucket_size = 0
        self.inflight: list[tuple[dist.Work, torch.Tensor, list[torch.nn.Parameter]]] = []

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        k = id(p)
        self.counts[k] = self.counts.get(k, 0) + 1
        if self.counts[k] == self.n_micro:
            self._add(p)
            if self.bucket_size >= self.bucket_bytes:
                self._launch()
                self.launched_during_backward += 1

    def _add(self, p) -> None:
        self.done.add(id(p))
        self.bucket.append(p)
        self.bucket_size += p.grad.numel() * p.grad.element_size()

    def _launch(self) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in self.bucket])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.inflight.append((work, flat, self.bucket))
        self.bucket, self.bucket_size = [], 0

    def finish(self) -> None:
        """Average every gradient over the group; call once per step after all micro-batches."""
        if self.size == 1:
            return
        for p in self.params:  # in a fixed order, so leftovers line up across ranks
            if id(p) not in self.done and p.grad is not None:
                self._add(p)
        if self.bucket:
            self._launch()
        for work, flat, bucket in self.inflight:
            work.wait()
            flat.div_(self.size)
            for p, v in zip(bucket, flat.split([p.grad.numel() for p in bucket])):
                p.grad.copy_(v.view_as(p.grad))
        self._reset()
