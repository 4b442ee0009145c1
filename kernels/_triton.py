"""What every Triton launcher shares: the optional import, launch checks, row views, block sizes, and
the launch itself (which ``recording_launches`` turns into a record, for the ahead-of-time compile).

Triton decides at the moment a kernel is defined (when ``kernels/`` is imported) whether it will be
compiled for the GPU or run by its interpreter (``TRITON_INTERPRET=1``, which runs kernels on CPU
tensors, slowly). The torch path must keep working where Triton is not installed, so the import
is optional and a launch without it is a clear error, not an ``AttributeError``.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - the torch path still works
    HAVE_TRITON = False

    class _NoTriton:
        """Stands in for ``triton`` / ``triton.language`` so the kernel files still import."""

        constexpr = int

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    InterpretedFunction = ()


def _interpreted() -> bool:
    """Whether ``triton.jit`` gives the interpreter's functions (the probe is local: it is no kernel)."""
    @triton.jit
    def probe(X):
        pass

    return isinstance(probe, InterpretedFunction)


INTERPRETED = HAVE_TRITON and _interpreted()

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error, before any launch, when these tensors cannot go to a Triton kernel."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{op}: Triton is not installed; install triton or use kernels=torch")
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all inputs must be on one device, got {device} and {t.device}")
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    raise RuntimeError(f"{op}: Triton kernels need CUDA tensors (got {device}); on a CPU use kernels=torch, "
                       "or set TRITON_INTERPRET=1 before triton is first imported to run them interpreted")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, last dim) view with unit stride along the last dim; copies only when it must.

    Kernels take the row stride as an argument, so a slice such as ``big[:, :123]`` needs no copy.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


def num_warps(block: int) -> int:
    return 16 if block >= 16384 else 8 if block >= 2048 else 4


def row_warps(block: int) -> int:
    """Warps for a program that holds ``block`` columns of a row: 16 elements per thread from 2048 up."""
    return max(4, min(16, block // 512))


# FMA contraction, pinned rather than left to Triton's default (on in 3.9, off from 3.10). Off: these
# kernels are bandwidth-bound, so a fused multiply-add saves no measurable time, while without it the
# GPU rounds each product and sum as the interpreter (numpy) and torch's reference do, so one tolerance
# holds for both; and a Triton upgrade cannot silently change our numerics. Every launch and the
# ahead-of-time compile check (scripts/compile_kernels.py) pass this same value.
FP_FUSION = False

# What an SM of sm_80 and sm_90 offers to resident programs (CUDA occupancy limits).
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
PROGRAMS_PER_SM = 32
SM_COUNT = {80: 108, 90: 132}  # A100 and H100/H200, for the ahead-of-time compile check


class Launch(NamedTuple):
    """One kernel launch as a launcher decided it: kernel, grid, arguments, launch options."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict
    programs_per_sm: int | None  # the residency the grid was sized for (None: grid follows the data)


# Set only by ``recording_launches``: launchers then describe their launches instead of running them.
_recorder: ContextVar = ContextVar("kernel_launch_recorder", default=None)


@contextmanager
def recording_launches(sm_count: int):
    """Within: launchers (called on meta tensors) record their launches, sized for ``sm_count`` SMs.

    This is how scripts/compile_kernels.py compiles exactly what the launchers would launch, with no
    copy of their choice of block, warps and grid.
    """
    launches: list[Launch] = []
    token = _recorder.set((launches, sm_count))
    try:
        yield launches
    finally:
        _recorder.reset(token)


def launch(kernel, grid, *args, programs_per_sm=None, **kwargs):
    kwargs = {**kwargs, "enable_fp_fusion": FP_FUSION}
    recorder = _recorder.get()
    if recorder is not None:
        recorder[0].append(Launch(kernel, tuple(grid), args, kwargs, programs_per_sm))
    else:
        kernel[grid](*args, **kwargs)


def sm_count(device: torch.device) -> int:
    recorder = _recorder.get()
    if recorder is not None:
        return recorder[1]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few programs, so that tests walk several row ranges


def resident_programs(registers: int, warps: int) -> int:
    """Programs of ``warps`` warps using ``registers`` per thread that fit on one SM at once."""
    per_warp = -(-registers // 8) * 8 * 32  # allocated per warp in units of 8 registers per thread
    return max(0, min(REGISTERS_PER_SM // (per_warp * warps), THREADS_PER_SM // (32 * warps), PROGRAMS_PER_SM))


def n_programs(device: torch.device, n_rows: int, per_sm: int) -> int:
    """Programs for a kernel that loops over rows (to reduce per-program partial sums): one wave."""
    return max(1, min(per_sm * sm_count(device), n_rows))
