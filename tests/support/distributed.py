"""Run a function on several CPU processes joined by gloo, and collect what each returns.

    results = run_distributed(fn, world_size=4, args=(cfg,))

scripts/_common.py's spawner (see there), with every process, unless ``nccl_contract=False``, under
the NCCL contract (`tests/support/nccl_contract.py`: one Work per p2p batch, contiguous tensors on the
process's device, untagged p2p).
"""
from __future__ import annotations

from scripts._common import TIMEOUT_S, run_distributed as _spawn
from tests.support.nccl_contract import install


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = TIMEOUT_S, *,
                    nccl_contract: bool = True) -> list:
    return _spawn(fn, world_size, args, timeout, setup=install if nccl_contract else None)
