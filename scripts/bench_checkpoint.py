"""How long a checkpoint save stalls training: synchronous vs asynchronous (`checkpoint.async_save`), in one run.

    python scripts/bench_checkpoint.py [--dim 1024] [--layers 6] [--ffn 2816] [--rounds 3] [--save-every 3]

Two real Trainers of the same model (same init, same batches) live side by side, one saving
synchronously, one asynchronously; they take turns, a round being ``--save-every`` steps and one
save, so a change in machine load hits both. Reported per mode (medians):
the median step time without a save, the time training waits for a save (sync: the whole write,
fsync, manifest and rename; async: the device→host copy, plus whatever of the background write is
still running when the next save is due), the step right after a save (async: it
shares the machine with the background write), and the wall time of the whole run including the
wait for the last save. A world of one process; the checkpoint holds weights and both AdamW moments.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoint import list_checkpoints  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.data import is_prepared, prepare_data  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def small_corpus(out: Path) -> Path:
    """Two standard-library packages (about 0.6 MB): enough text for a 512-token vocabulary."""
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email"):
        for f in (stdlib / pkg).glob("*.py"):
            shutil.copy(f, out / f"{pkg}_{f.name}")
    return out


def config(a, run_dir: str, async_save: bool) -> Config:
    cfg = Config()
    m = cfg.model
    m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size = a.dim, a.layers, 16, 8, a.ffn, 512
    cfg.train.global_batch_size = cfg.parallel.micro_batch_size = a.batch
    cfg.train.seq_len, cfg.train.max_steps, cfg.train.log_interval = a.seq, 10**6, 10**6
    cfg.data.dir, cfg.run_dir, cfg.kernels = a.data_dir, run_dir, "torch"
    cfg.checkpoint.keep_last, cfg.checkpoint.async_save = 1, async_save
    return cfg


def measure(a) -> dict:
    """Both trainers side by side, alternating rounds of ``--save-every`` steps + one save, so a
    change in machine load hits both modes alike."""
    modes = tuple(a.order.split(","))
    run_dirs = {m: tempfile.mkdtemp(prefix=f"bench_ckpt_{m}_", dir=a.tmp) for m in modes}
    trainers = {m: Trainer(config(a, run_dirs[m], m == "async")) for m in modes}
    out = {m: {"steps": [], "saves": [], "after": [], "wall": 0.0} for m in modes}
    try:
        for t in trainers.values():  # warm-up
            t.train_step()
        for _ in range(a.rounds):
            for m, t in trainers.items():
                r = out[m]
                t0 = time.perf_counter()
                if m == "async":  # save first, so the background write overlaps this trainer's own steps
                    s0 = time.perf_counter()
                    t.save()
                    stall = time.perf_counter() - s0
                for i in range(a.save_every):
                    s0 = time.perf_counter()
                    t.train_step()
                    (r["after"] if i == 0 and (m == "async" or r["saves"]) else r["steps"]).append(
                        time.perf_counter() - s0)
                s0 = time.perf_counter()
                if m == "async":  # what the next save would still wait for, counted as stall too
                    t.saver.wait()
                    r["saves"].append(stall + time.perf_counter() - s0)
                else:
                    t.save()
                    r["saves"].append(time.perf_counter() - s0)
                r["wall"] += time.perf_counter() - t0
        for m, t in trainers.items():
            last = ckpt_dirs(run_dirs[m])[-1]
            out[m]["ckpt_bytes"] = sum(f.stat().st_size for f in last.iterdir())
            out[m]["params"] = sum(r.param.numel() for r in t.refs)
    finally:
        for m, t in trainers.items():
            t.close()
            shutil.rmtree(run_dirs[m], ignore_errors=True)
    return {m: {"params": r["params"], "ckpt_bytes": r["ckpt_bytes"], "step": statistics.median(r["steps"]),
                "save": statistics.median(r["saves"]), "after": statistics.median(r["after"]), "wall": r["wall"]}
            for m, r in out.items()}


def ckpt_dirs(run_dir: str) -> list[Path]:
    return list_checkpoints(Path(run_dir) / "checkpoints")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --save-every steps and one save, per mode")
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--order", default="sync,async", choices=["sync,async", "async,sync"],
                    help="which mode goes first in each round")
    ap.add_argument("--data-dir", default="data/bench_checkpoint")
    ap.add_argument("--tmp", default=None, help="where the checkpoints go (default: the system temp dir)")
    a = ap.parse_args()
    if not is_prepared(a.data_dir):
        with tempfile.TemporaryDirectory() as corpus:
            prepare_data(str(small_corpus(Path(corpus))), a.data_dir, 512, progress=False)
    results = measure(a)
    r = results["sync"]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {r['params'] / 1e6:.1f}M params ({4 * r['params'] / 2**20:.0f} MiB fp32 weights), checkpoint "
          f"{r['ckpt_bytes'] / 2**20:.0f} MiB, {a.rounds} rounds of {a.save_every} steps + a save per mode, "
          f"alternating, {dev}")
    print(f"{'mode':<6} {'step ms':>9} {'save stall ms':>14} {'step after save ms':>19} {'run wall s':>11}")
    for mode, r in results.items():
        print(f"{mode:<6} {1000 * r['step']:>9.0f} {1000 * r['save']:>14.0f} {1000 * r['after']:>19.0f} "
              f"{r['wall']:>11.1f}")
    print(f"async stall / sync stall: {results['async']['save'] / results['sync']['save']:.3f}")


if __name__ == "__main__":
    main()
