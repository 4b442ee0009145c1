"""What NCCL enforces and gloo forgives, enforced on gloo: the multi-rank CPU tests run under it.

Test code, not a product mode. `install()` patches ``torch.distributed`` in the calling process so
that, as on NCCL:

- `batch_isend_irecv` returns **one** Work for the whole batch (NCCL launches a batch as one group
  kernel and returns one coalesced Work; gloo returns one per op). Code that pairs works with ops
  fails here as it would on GPUs.
- every tensor handed to a collective or a p2p op is contiguous and on the process's device
  (``device_type``; NCCL serves CUDA tensors only, so a host copy such as ``.cpu()`` fails there).
  On a CPU world the device rule is trivially met; `tests/parallel/test_nccl_contract.py` checks placement
  against a fake CUDA device instead.
- p2p messages carry no tag: NCCL ignores tags and matches a rank pair's messages in posting order,
  so every op is posted with tag 0 and a runtime that relied on tags to match would get the wrong
  tensor here too (the pipeline validator proves the posting orders agree).

`violations` collects what was refused and `calls` counts what was checked, for tests that assert
on them; every violation also raises at the call, naming the op and the tensor.

``dry=True`` checks and counts every call but sends nothing (each returns a finished Work): with
the mesh's device set to ``meta``, PyTorch's data-less device, a whole training step runs on a CPU
as if on an accelerator, and any tensor that lands on the host on its way to a collective shows up
as a ``cpu`` tensor and is refused, which is the device rule NCCL enforces
(`tests/parallel/test_nccl_contract.py`).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

# collectives and p2p ops of torch.distributed whose tensor arguments NCCL must be able to serve
TENSOR_OPS = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
              "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single", "all_to_all",
              "gather", "scatter", "send", "recv")
# (isend / irecv are left alone: P2POp accepts torch's own functions only, and batch_isend_irecv,
# which is checked as a whole, is how the engine posts them)


class ContractViolation(RuntimeError):
    """A call NCCL would refuse (or silently mis-handle)."""


class DoneWork:
    """The Work of a call the dry layer checked and did not send."""

    def wait(self, timeout=None):
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True


class CoalescedWork:
    """One Work for a batch of p2p ops, as NCCL returns: complete only when every op is."""

    def __init__(self, works):
        self._works = list(works)
        self._done = False

    def wait(self, timeout=None):
        # waiting again is a no-op, as on NCCL (a gloo p2p work must be waited on once: a second
        # wait() on its buffer blocks for a message that never comes)
        if not self._done:
            for w in self._works:
                w.wait() if timeout is None else w.wait(timeout)
            self._done = True
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def is_success(self) -> bool:
        return all(w.is_success() for w in self._works)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)


class NcclContract:
    def __init__(self, device_type: str = "cpu", *, dry: bool = False):
        self.device_type = device_type
        self.dry = dry
        self.violations: list[str] = []
        self.calls: dict[str, int] = {}
        self._originals: dict[str, object] = {}

    def check(self, op: str, tensors) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        for i, t in enumerate(tensors):
            problem = None
            if t.device.type != self.device_type:
                problem = f"is on {t.device}, not on the process's {self.device_type} device"
            elif not t.is_contiguous():
                problem = f"is not contiguous (shape {tuple(t.shape)}, stride {t.stride()})"
            if problem:
                msg = f"{op}: tensor argument {i} {problem}; NCCL would refuse it"
                self.violations.append(msg)
                raise ContractViolation(msg)

    def _wrap(self, name: str):
        original = getattr(dist, name)

        @functools.wraps(original)
        def checked(*args, **kwargs):
            self.check(name, [t for a in (*args, *kwargs.values()) for t in _tensors(a)])
            if self.dry:
                return DoneWork() if kwargs.get("async_op") else None
            if name in ("send", "recv"):
                kwargs["tag"] = 0
            return original(*args, **kwargs)

        return original, checked

    def _batch_isend_irecv(self, original):
        @functools.wraps(original)
        def coalesced(ops):
            self.check("batch_isend_irecv", [op.tensor for op in ops])
            if self.dry:
                return [DoneWork()] if ops else []
            untagged = [dist.P2POp(op.op, op.tensor, op.peer, op.group, 0) for op in ops]
            works = original(untagged)
            return [CoalescedWork(works)] if works else works

        return coalesced

    def install(self) -> "NcclContract":
        for name in TENSOR_OPS:
            if hasattr(dist, name):
                self._originals[name], wrapped = self._wrap(name)
                setattr(dist, name, wrapped)
        self._originals["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._batch_isend_irecv(dist.batch_isend_irecv)
        return self

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals = {}


def install(device_type: str = "cpu", *, dry: bool = False) -> NcclContract:
    """Put this process under the contract (idempotent: a second call returns the first layer)."""
    current = getattr(dist, "_tandem_nccl_contract", None)
    if current is not None:
        return current
    layer = NcclContract(device_type, dry=dry).install()
    dist._tandem_nccl_contract = layer
    return layer
