"""The planner's cost model against published training runs: Megatron-LM SC21 Table 1 (GPT 1.7B to 1T on
up to 3072 A100s).

    python scripts/validate_planner.py [--device a100] [--csv docs/data/sc21_table1.csv]

Each GPT row is mapped onto the Llama-style model the planner costs: multi-head attention (the row's
head count), an MLP of three d × f matrices with f ≈ 8h/3 (a multiple of tp) so its FLOPs equal GPT's two
h × 4h, tied embeddings, vocabulary 51200, sequence 2048, full recompute, bf16 for the paper's fp16,
optim.zero=0 (Megatron's 2021 optimizer kept every state on every dp rank), pipeline messages in bf16,
and the attention as Megatron ran it then: T×T scores in memory with softmax and dropout on them
(``Setup.attention="unfused"``). The row's exact layout (tp, pp, dp, micro-batch, interleaving, the even
split of layers) is evaluated, not searched (`engine.planner.evaluate_partition`).

Predicted TFLOP/s per GPU counts the paper's own FLOPs (Eq. 3, which includes the recompute forward)
over the predicted step time, so predicted / published is published step time / predicted step time.
The memory verdict is the planner's per-rank peak plus the device's reserve against its memory.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import planner as P  # noqa: E402
from engine.layout import even_split  # noqa: E402
from models.config import ModelConfig  # noqa: E402

CSV = Path(__file__).resolve().parents[1] / "docs" / "data" / "sc21_table1.csv"
SEQ, VOCAB = 2048, 51200


@dataclass
class Row:
    name: str
    published: float  # TFLOP/s per GPU
    predicted: float
    step_s: float
    peak_gb: float  # the largest per-rank peak, reserve included
    fits: bool
    setup: P.Setup
    layout: str

    @property
    def ratio(self) -> float:
        return self.predicted / self.published


def read_rows(path: Path = CSV) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def eq3_flops(batch: int, layers: int, hidden: int) -> float:
    """The paper's Eq. 3: FLOPs of one step with full recompute (forward counted twice)."""
    return 96 * batch * SEQ * layers * hidden ** 2 * (1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))


def llama_for(r: dict) -> ModelConfig:
    h, tp, heads = int(r["hidden"]), int(r["tp"]), int(r["heads"])
    ffn = tp * round(8 * h / (3 * tp))  # 3·h·f = 2·h·4h, rounded to a multiple of tp
    return ModelConfig(dim=h, n_layers=int(r["layers"]), n_heads=heads, n_kv_heads=heads, ffn_dim=ffn,
                       vocab_size=VOCAB, max_seq_len=SEQ, tie_embeddings=True)


def evaluate_row(r: dict, device: P.DeviceProfile) -> Row:
    tp, pp, dp, v = (int(r[k]) for k in ("tp", "pp", "dp", "virtual_stages"))
    mb, gb = int(r["micro_batch"]), int(r["global_batch"])
    setup = P.Setup(llama_for(r), tp=tp, pp=pp, dp=dp, seq_len=SEQ, global_batch=gb, recompute="full", zero=0,
                    precision="bf16", p2p_dtype="bf16", attention="unfused")
    schedule = "interleaved_1f1b" if v > 1 else "1f1b"
    lps = even_split(setup.mcfg.n_layers, pp * v)
    step, _, reports = P.evaluate_partition(setup, device, lps, schedule=schedule, micro_batch=mb, virtual_stages=v)
    gpus = tp * pp * dp
    predicted = eq3_flops(gb, int(r["layers"]), int(r["hidden"])) / (step * gpus) / 1e12
    peak = max(rep.peak_mem for rep in reports) / P.GB + device.reserve_gb
    layout = f"tp{tp} pp{pp} dp{dp} mb{mb}" + (f" v{v}" if v > 1 else "")
    return Row(f"{r['params_b']}B", float(r["tflops_per_gpu"]), predicted, step, peak, peak <= device.mem_gb,
               setup, layout)


def validate(device: str = "a100", path: Path = CSV) -> list[Row]:
    dev = P.get_device(device)
    return [evaluate_row(r, dev) for r in read_rows(path)]


def format_table(rows: list[Row], device: str = "a100") -> str:
    mem = P.get_device(device).mem_gb
    out = [f"{'model':>8} {'layout':>24} {'published':>9} {'predicted':>9} {'ratio':>6} {'step s':>7} "
           f"{'peak GB':>7}  memory ({mem:.0f} GB)"]
    for r in rows:
        out.append(f"{r.name:>8} {r.layout:>24} {r.published:>9.1f} {r.predicted:>9.1f} {r.ratio:>6.3f} "
                   f"{r.step_s:>7.2f} {r.peak_gb:>7.1f}  {'fits' if r.fits else 'DOES NOT FIT'}")
    worst = max(rows, key=lambda r: abs(r.ratio - 1))
    out.append(f"TFLOP/s per GPU (paper's Eq. 3 FLOPs); {sum(abs(r.ratio - 1) <= 0.10 for r in rows)}/{len(rows)} "
               f"rows within ±10%, worst {worst.name} at {worst.ratio:.3f}; "
               f"{sum(r.fits for r in rows)}/{len(rows)} judged to fit")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="a100")
    ap.add_argument("--csv", type=Path, default=CSV)
    a = ap.parse_args()
    rows = validate(a.device, a.csv)
    print(f"Megatron-LM SC21 Table 1 ({a.csv.name}) against the planner's cost model on planner.device={a.device}")
    print(format_table(rows, a.device))


if __name__ == "__main__":
    main()
