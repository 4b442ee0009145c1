"""Helpers the scripts share: for now, running a function on a local gloo world of CPU processes.

    results = run_distributed(fn, world_size=4, args=(cfg,))

``fn(rank, world_size, *args)`` runs in a fresh (spawned) process with the default process group
initialized; it must be importable (module level). ``setup()``, when given (also module level), runs
in each process after the group is up and before ``fn``: the tests install their NCCL contract there.
A failure on any rank raises in the caller with that rank's traceback.

Scripts import no test code; the tests import this (tests/support/distributed.py).
"""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300


def _worker(rank, world_size, init_file, fn, args, queue, setup):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        # a file rendezvous: no port to pick, so parallel worlds cannot race for one
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        if setup is not None:
            setup()
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = TIMEOUT_S, *, setup=None) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="tandem-dist-")
    init_file = Path(tmp) / "rendezvous"
    procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue, setup), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
