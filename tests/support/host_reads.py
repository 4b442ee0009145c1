"""Count the reads of tensor values back to the host (for tests/unit/test_sync_free.py).

On a GPU every one of these is a device->host synchronization: `item`, `tolist`, `cpu`, `numpy`
and the Python conversions `bool`, `float`, `int` (an `if tensor:` is a `bool`). The counter wraps
them on `torch.Tensor` for the duration of a `with` block. Kept apart from the test module because a
spawned rank imports the module of the function it runs.
"""
from __future__ import annotations

import contextlib
import traceback

import torch

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def counting_host_reads():
    """Yields a list that collects one (method, innermost project frame, innermost frame, device) per
    host read in the block."""
    seen: list[tuple[str, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    depth = [0]  # a read made inside another counted read (cpu() inside numpy()) counts once

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if depth[0] == 0:
                stack = traceback.extract_stack()[:-1]
                ours = [f for f in stack if "/torch/" not in f.filename]
                where = f"{'/'.join(ours[-1].filename.rsplit('/', 2)[-2:])}:{ours[-1].lineno}" if ours else "?"
                seen.append((name, where, stack[-1].filename, self.device.type))
            depth[0] += 1
            try:
                return fn(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def on_device_path(reads: list[tuple]) -> list[tuple[str, str]]:
    """The reads that would synchronize with a GPU: all but two kinds of reads of tensors that live
    on the host by design: the data loader's batch (`engine/data`, assembled from numpy before its
    copy to the device) and AdamW's step counters (torch keeps them on the CPU unless the optimizer
    is fused or capturable, precisely so that reading them costs no synchronization)."""
    return [(name, where) for name, where, innermost, device in reads
            if not (device == "cpu" and (where.startswith("data/") or "/torch/optim/" in innermost))]


def host_reads_per_step(rank, world, runs: dict[str, list[str]], steps: int) -> dict[str, list[list[tuple]]]:
    """For each composed override list, in order (one spawned world serves them all): build the
    trainer, run one warm-up step uncounted, then ``steps`` counted training steps; returns each run's
    host reads per counted step, and under ``name + ":peak_mem_mib"`` the counted steps' per-rank peaks."""
    import torch.distributed as dist

    from engine.trainer import Trainer
    from tests.support.launch import compose

    out = {}
    for name, overrides in runs.items():
        trainer = Trainer(compose(overrides))
        try:
            trainer.train_step()
            out[name], out[name + ":peak_mem_mib"] = [], []
            for _ in range(steps):
                with counting_host_reads() as seen:
                    record = trainer.train_step()
                out[name].append(seen)
                out[name + ":peak_mem_mib"].append(record["peak_mem_mib"])
            dist.barrier()
        finally:
            trainer.close()
    return out
