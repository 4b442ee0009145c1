"""Throughput and model FLOPs utilization, per-rank peak memory, and the rank-0 metrics log
(``metrics.jsonl``, mirrored to TensorBoard with ``metrics.tensorboard=true``)."""
from __future__ import annotations

import json
import numbers
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets; matched by device name.
# "H100 PCIe" before "H100": the PCIe part peaks at 756 (the planner's h100_pcie profile), the SXM at 989.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def device_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, label). On a CPU or an unknown GPU the peak is None: MFU is reported as null."""
    if device.type != "cuda":
        return None, "cpu: no known peak, mfu reported as null"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s bf16 dense"
    return None, f"{name}: unknown peak, mfu reported as null"


class PeakMemory:
    """This rank's peak memory since the previous `take` (MiB): the CUDA caching allocator's peak of
    allocated bytes on a GPU, the process's peak resident set (VmHWM) on a CPU. Both are host-side
    counters: reading and resetting them costs no device synchronization. Where the kernel refuses
    the VmHWM reset (/proc/self/clear_refs), the CPU peak is the process's lifetime peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.take()

    def take(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak / 2**20
        peak = _vm_kib("VmHWM")
        try:
            Path("/proc/self/clear_refs").write_text("5")   # 5: reset the peak RSS to the current RSS
        except OSError:
            pass
        return peak / 1024


def _vm_kib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource   # no /proc (macOS): the lifetime peak, in KiB on Linux and bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform == "darwin" else float(rss)


# per-rank lists: TensorBoard gets their max, the rank holding it and their mean (one tag per rank
# would be thousands of tags at scale); metrics.jsonl keeps the whole list
PER_RANK = ("peak_mem_mib",)


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers as TensorBoard scalars: booleans as 0/1, a per-rank list (`PER_RANK`) as
    ``key/max``, ``key/argmax`` (the global rank) and ``key/mean``, another list as ``key/<index>``,
    None (mfu on a CPU) and ``step`` left out."""
    out = {}
    for k, v in record.items():
        if k in PER_RANK and isinstance(v, (list, tuple)) and v:
            top = max(range(len(v)), key=lambda i: v[i])
            items = [(f"{k}/max", v[top]), (f"{k}/argmax", top), (f"{k}/mean", sum(v) / len(v))]
        elif isinstance(v, (list, tuple)):
            items = [(f"{k}/{i}", x) for i, x in enumerate(v)]
        else:
            items = [(k, v)]
        for name, x in items:
            if isinstance(x, numbers.Real) and k != "step":
                out[name] = float(x)
    return out


class MetricsLog:
    """Appends one JSON object per record to ``<run_dir>/metrics.jsonl`` (rank 0 only); with
    ``tensorboard_dir``, writes the same records' scalars there at ``global_step = record["step"]``.
    ``purge_step`` (a training resume) drops the TensorBoard events of the abandoned later history.
    Nothing is created before the first record: a launch that fails in its setup (a restore, a
    check) leaves no event file and no purge marker behind."""

    def __init__(self, path: Path | None, *, tensorboard_dir: Path | None = None, purge_step: int | None = None):
        self.path = path
        self.tensorboard_dir = tensorboard_dir if path is not None else None
        self.purge_step = purge_step
        self.tb = None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard_dir is not None and self.tb is None:
            from torch.utils.tensorboard import SummaryWriter   # validate() checked the package is there
            self.tb = SummaryWriter(str(self.tensorboard_dir), purge_step=self.purge_step, flush_secs=30)
        if self.tb is not None:
            for name, value in scalars(record).items():
                self.tb.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
