"""A step's tokens on this rank's device: only this dp rank's rows, read once, copied once.

Each dp rank reads its own contiguous slice of the step's global batch (rows ``dp_rank·n ..
(dp_rank+1)·n − 1``, n = global / dp) as one (n, T + 1) window tensor: inputs are its [:, :-1],
targets its [:, 1:], so the tokens cross to the device in one copy. Pipeline stages that read no
tokens (neither first nor last) read nothing. On CUDA the copy goes from pinned memory with
``non_blocking=True``: it is queued behind the device's work instead of making the host wait for it.
"""
from __future__ import annotations

from typing import Callable

import torch


def dp_rows(global_batch: int, dp: int, dp_rank: int) -> tuple[int, int]:
    """(first row, row count) of this dp rank's slice of a global batch."""
    n = global_batch // dp
    return dp_rank * n, n


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device``: pinned and non-blocking on CUDA; unchanged on a CPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def local_batch(read: Callable[[int, int], torch.Tensor], mesh, global_batch: int):
    """(inputs, targets) of this rank's rows on its device, None where its pipeline stage takes none.
    ``read(first, count)`` returns the (count, T + 1) windows of those rows of the global batch."""
    if not (mesh.is_first_stage or mesh.is_last_stage):
        return None, None
    w = to_device(read(*dp_rows(global_batch, mesh.dp, mesh.dp_rank)), mesh.device)
    return (w[:, :-1] if mesh.is_first_stage else None), (w[:, 1:] if mesh.is_last_stage else None)
