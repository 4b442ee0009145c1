"""Run a function on several CPU processes joined by gloo, and collect what each returns.

    results = run_distributed(fn, world_size=4, args=(cfg,))

``fn(rank, world_size, *args)`` runs in a fresh (spawned) process with the default process
group initialized and, unless ``nccl_contract=False``, under the NCCL contract
(`tests/support/nccl_contract.py`: one Work per p2p batch, contiguous tensors on the process's device,
untagged p2p); it must be importable (module level). A failure on any rank raises in the
caller with that rank's traceback.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

TIMEOUT_S = 300


def _worker(rank, world_size, init_file, fn, args, queue, contract):
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        # a file rendezvous: no port to pick, so parallel test worlds cannot race for one
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        if contract:  # refuse what NCCL refuses (tests/support/nccl_contract.py)
            from tests.support.nccl_contract import install

            install()
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = TIMEOUT_S, *,
                    nccl_contract: bool = True) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="tandem-dist-")
    init_file = Path(tmp) / "rendezvous"
    procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue, nccl_contract), daemon=True)
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
