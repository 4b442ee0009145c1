"""What every Triton launcher shares: the optional import, launch checks, row views, block sizes.

Triton decides at the moment a kernel is defined (when ``kernels/`` is imported) whether it will be
compiled for the GPU or run by its interpreter (``TRITON_INTERPRET=1``, which runs kernels on CPU
tensors, slowly). The torch path must keep working where Triton is not installed, so the import
is optional and a launch without it is a clear error, not an ``AttributeError``.
"""
from __future__ import annotations

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

if HAVE_TRITON:
    @triton.jit
    def _probe_kernel(X):
        pass

    INTERPRETED = isinstance(_probe_kernel, InterpretedFunction)
else:
    INTERPRETED = False

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


def n_programs(device: torch.device, n_rows: int) -> int:
    """Programs for a kernel that loops over rows (to reduce per-program partial sums): ~2 per SM."""
    n = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n, n_rows))
