"""The device mesh: pp × dp × tp ranks, tp innermost, pp outermost.

`Mesh` is built once per process and passed explicitly to whatever needs a process group.
There is no module-level distributed state.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from engine.layout import PLACEMENTS, stage_rank


@dataclass(frozen=True)
class Mesh:
    pp: int
    dp: int
    tp: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    rank: int
    world_size: int
    device: torch.device
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    device_mesh: DeviceMesh
    # which pp rank holds which pipeline stage (engine.layout.stage_rank): "loop", or "v" for the
    # schedules that place two chunks per rank in a V (zbv, dualpipev), where rank 0 holds the loss
    pp_placement: str = "loop"

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank holds the first pipeline stage (the embedding; it reads the inputs)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the last pipeline stage (the head and the loss; it reads the
        targets): pp rank pp-1, or pp rank 0 under the V placement."""
        return self.pp_rank == stage_rank(2 * self.pp - 1 if self.pp_placement == "v" else self.pp - 1,
                                          self.pp, self.pp_placement)

    def pp_global_rank(self, pp_rank: int) -> int:
        """Global rank of the process at pipeline position ``pp_rank`` with this rank's dp and tp."""
        return dist.get_global_rank(self.pp_group, pp_rank)

    def __repr__(self) -> str:
        return (f"Mesh(pp={self.pp}, dp={self.dp}, tp={self.tp}; rank {self.rank}/{self.world_size} at "
                f"pp={self.pp_rank} dp={self.dp_rank} tp={self.tp_rank}, {self.device})")


def resolve_dp(world_size: int, tp: int, pp: int, dp: int | None) -> int:
    """dp from the world size when not given; a clear error when the three cannot tile the world."""
    for name, v in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.dp", dp)):
        if v is not None and v < 1:
            raise ValueError(f"{name}={v} must be at least 1")
    if dp is None:
        if world_size % (tp * pp):
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.tp={tp} × parallel.pp={pp}; "
                f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp")
        return world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ValueError(
            f"parallel.tp={tp} × parallel.pp={pp} × parallel.dp={dp} = {tp * pp * dp} does not equal the "
            f"world size {world_size}; launch {tp * pp * dp} processes or change the three sizes")
    return dp


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else the CPU. Two processes of a node never
    share a GPU: NCCL refuses two ranks on one device, or deadlocks, much later and less clearly."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible on this node, so two ranks would "
            f"share a GPU; launch at most {n} processes per node (torchrun --nproc-per-node {n}) or make more "
            f"devices visible (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank)


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group torchrun describes in the environment, or form a group of one.

    Sets the CUDA device from LOCAL_RANK before `init_process_group`. Idempotent.
    """
    if dist.is_initialized():
        return
    device = default_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # a collective that outlasts the timeout makes NCCL's watchdog abort the communicators and end
        # the process (torchrun then stops the job) instead of hanging; engine/hang.py reports first
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # plain `python scripts/train.py`: a world of one, no network
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def build_mesh(*, tp: int = 1, pp: int = 1, dp: int | None = None, device: torch.device | None = None,
               placement: str = "loop") -> Mesh:
    """The mesh over the current process group. The group must already be initialized. ``placement``:
    how pipeline stages sit on the pp ranks (`engine.pipeline.generators.schedule_placement`)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown stage placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialized process group; call engine.mesh.init_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = resolve_dp(world, tp, pp, dp)
    device = device or default_device(int(os.environ.get("LOCAL_RANK", 0)))
    dm = init_device_mesh(device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    # rank = (pp_rank * dp + dp_rank) * tp + tp_rank
    return Mesh(pp=pp, dp=dp, tp=tp,
                pp_rank=rank // (dp * tp), dp_rank=(rank // tp) % dp, tp_rank=rank % tp,
                rank=rank, world_size=world, device=device,
                pp_group=dm.get_group("pp"), dp_group=dm.get_group("dp"), tp_group=dm.get_group("tp"),
                device_mesh=dm, pp_placement=placement)
