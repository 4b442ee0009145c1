"""Throughput and model FLOPs utilization, and the rank-0 metrics log."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets; matched by device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def device_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, label). On a CPU or an unknown GPU the peak is None: MFU is reported as null."""
    if device.type != "cuda":
        return None, "cpu: no known peak, mfu reported as null"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s bf16 dense"
    return None, f"{name}: unknown peak, mfu reported as null"


class MetricsLog:
    """Appends one JSON object per record to ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
