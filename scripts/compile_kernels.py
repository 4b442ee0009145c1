"""Compile every Triton kernel ahead of time for sm_80 and sm_90, on a machine with no GPU, and check
that none spills registers to local memory.

    python scripts/compile_kernels.py [--quick] [--jobs N] [--cache-dir DIR]

The launch configurations are the launchers' own (kernels/compile_check.py records them on meta
tensors); the shapes are realistic ones (hidden up to 65536, FFN 14336 and its tp=8 shard, 1-128 heads
of 128, vocabulary 128256 and its tp=8 shard, 8192 and 131072 tokens), bf16 and fp32. Prints one row
per distinct compile and ends with ``N compiled, M failed, S spilling``; exits 1 unless M and S are 0
and every launcher's grid fits the residency its kernel's registers allow. Compiled kernels are cached
(Triton's cache, in --cache-dir), so a second run takes seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# kernels/ is imported only inside the functions below, once TRITON_INTERPRET is gone and
# TRITON_CACHE_DIR is set: Triton reads both when the kernels are defined (when kernels/ is imported).


def parse_args():
    from kernels.compile_check import default_cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes, still every kernel and constexpr variant")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="Triton's compile cache (TRITON_CACHE_DIR)")
    return p.parse_args()


def main() -> int:
    if os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        # the interpreter's kernels cannot be compiled; it is read when kernels/ is imported, so re-run
        os.execv(sys.executable, [sys.executable, *sys.argv])
    args = parse_args()
    os.environ["TRITON_CACHE_DIR"] = args.cache_dir  # before triton reads it; spawned workers inherit it
    from kernels import compile_check as cc

    start = time.perf_counter()
    jobs = cc.plan(cc.QUICK if args.quick else cc.Shapes())
    results = cc.compile_all(jobs, args.jobs)
    print(cc.table(results))
    crowded = [r for r in results if r.under_occupied]
    for r in crowded:
        print(f"{r.job.kernel} sm_{r.job.arch}: the launcher assumes {r.job.programs_per_sm} programs per SM, "
              f"its {r.registers} registers x {r.warps} warps allow {r.resident}")
    print(f"{len(jobs)} distinct compiles in {time.perf_counter() - start:.0f} s ({args.jobs} processes, "
          f"cache {args.cache_dir})")
    print(cc.summary(results))
    return 0 if cc.summary(results).endswith(" 0 failed, 0 spilling") and not crowded else 1


if __name__ == "__main__":
    sys.exit(main())
