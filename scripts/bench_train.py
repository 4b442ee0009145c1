"""Tokens/s of Tandem's training step, eager and compiled, against a minimal plain-PyTorch loop, in one run.

    python scripts/bench_train.py [--model tiny] [--steps 30] [--batch 16] [--micro 8] [--seq 128]
                                  [--compile-backend inductor] [--no-compile]

The loops train the same model (same init), on the same batches, with AdamW, warmup+cosine and
gradient clipping; the plain loop is what one would write by hand for one device; "compiled" is
Tandem with ``train.compile=true`` (each transformer block one `torch.compile` graph). Runs alternate
(plain, Tandem, compiled, plain ...) so drift in machine speed hits all; the median step time is used.
The compile itself happens in the warm-up and is reported apart.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import Config  # noqa: E402
from engine.data import prepare_data  # noqa: E402
from engine.memory import persistent_bytes  # noqa: E402
from engine.optim import lr_at, param_refs  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from models import Llama, init_weights  # noqa: E402


class PlainLoop:
    def __init__(self, cfg: Config, data):
        self.cfg, self.data = cfg, data
        mcfg = cfg.model.build()
        self.model = init_weights(Llama(mcfg, kernels=cfg.kernels), seed=cfg.train.seed, n_layers=mcfg.n_layers)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        rest = [p for p in self.model.parameters() if p.ndim < 2]
        o = cfg.optim
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2))
        self.step = 0

    def train_step(self):
        c = self.cfg
        x, y = self.data.train_batch(self.step, seed=c.train.seed, batch_size=c.train.global_batch_size,
                                     seq_len=c.train.seq_len)
        m = c.train.global_batch_size // c.parallel.micro_batch_size
        for xb, yb in zip(x.chunk(m), y.chunk(m)):
            (self.model(xb, yb) / m).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.clip_grad)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, lr=c.optim.lr, warmup_steps=c.optim.warmup_steps,
                            max_steps=c.train.max_steps, min_lr_ratio=c.optim.min_lr_ratio)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1


def timed(loop, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loop.train_step()
        out.append(time.perf_counter() - t0)
    return out


def bytes_per_parameter(model: torch.nn.Module, dp: int) -> dict[str, float]:
    """Persistent bytes per parameter on the fullest of ``dp`` data-parallel ranks, per optimizer mode,
    from `engine.memory.persistent_bytes` (the rules the launch report prints and
    tests/parallel/test_zero2.py holds against real tensors); no process group needed."""
    n = sum(p.numel() for p in model.parameters())
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    out = {}
    for label, zero, m in (("zero=0", 0, model), ("zero=1", 1, model), ("zero=2", 2, model),
                           ("zero=2, bf16 params", 2, bf16)):
        if m is bf16 and dp == 1:
            continue   # bf16 parameters need dp > 1 (at dp=1, zero=2 runs as zero=0 in fp32)
        refs = param_refs([m])
        totals = [persistent_bytes(refs, [m], SimpleNamespace(dp=dp, dp_rank=r), zero=zero)["total"]
                  for r in range(dp)]
        out[label] = max(totals) / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--data-dir", default="data/stdlib")
    ap.add_argument("--compile-backend", default="inductor", help="train.compile_backend of the compiled column")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled column")
    ap.add_argument("--dp", type=int, default=8, help="data-parallel size of the bytes/parameter table")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.name = a.model
    cfg.train.global_batch_size, cfg.parallel.micro_batch_size, cfg.train.seq_len = a.batch, a.micro, a.seq
    cfg.train.max_steps = 10**6
    cfg.data.dir = a.data_dir
    cfg.run_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg.kernels = "torch" if not torch.cuda.is_available() else "auto"
    if not Path(a.data_dir, "meta.json").is_file():
        prepare_data("stdlib", a.data_dir, cfg.model.build().vocab_size)
    loops = {"tandem": Trainer(cfg)}
    data = loops["tandem"].data
    loops = {"plain": PlainLoop(cfg, data), **loops}
    compile_s = None
    if not a.no_compile:
        ccfg = copy.deepcopy(cfg)
        ccfg.train.compile, ccfg.train.compile_backend = True, a.compile_backend
        ccfg.run_dir = tempfile.mkdtemp(prefix="bench_train_compiled_")
        loops["compiled"] = Trainer(ccfg)
        t0 = time.perf_counter()
        timed(loops["compiled"], 1)  # the first step compiles the blocks' forward and backward
        compile_s = time.perf_counter() - t0
    for loop in loops.values():
        timed(loop, 3)  # warm-up
    times = {k: [] for k in loops}
    for _ in range(a.rounds):
        for k, loop in loops.items():
            times[k] += timed(loop, a.steps)
    tokens = a.batch * a.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {a.model}, batch {a.batch} x {a.seq} tokens, micro-batch {a.micro}, {a.rounds}x{a.steps} steps each, {dev}")
    print(f"{'loop':<20} {'tokens/s':>10} {'median step ms':>15}")
    for k in loops:
        label = f"compiled ({a.compile_backend})" if k == "compiled" else k
        print(f"{label:<20} {tps[k]:>10.0f} {1000 * statistics.median(times[k]):>15.1f}")
    print(f"ratio tandem/plain: {tps['tandem'] / tps['plain']:.3f}  (goal >= 1.0)")
    if compile_s is not None:
        print(f"ratio compiled/tandem: {tps['compiled'] / tps['tandem']:.3f}; first compiled step (compile) "
              f"{compile_s:.1f} s")
    print(f"persistent bytes per parameter at dp={a.dp} (fullest rank; parameters, gradients, master "
          f"weights, moments, buffers):")
    for label, b in bytes_per_parameter(loops["tandem"].chunks[0], a.dp).items():
        print(f"  {label:<22} {b:6.2f}")


if __name__ == "__main__":
    main()
