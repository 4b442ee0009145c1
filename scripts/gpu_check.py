"""One command for the GPU: everything a CPU cannot prove, run in one go, written to one Markdown report.

    python scripts/gpu_check.py [--out gpu_check_report.md] [--only kernels,bench,train,compiled,equivalence]
    python scripts/gpu_check.py --dry-run        # this script's orchestration on a CPU, tiny settings

Parts, each with a time budget (about 10 minutes in all; ``--budget-scale`` stretches them; one GPU skips
part 5, leaving 7.5):

1. ``kernels``      tests/unit/test_kernels.py with the Triton kernels compiled (TRITON_INTERPRET unset).
2. ``bench``        scripts/bench_kernels.py: each kernel against torch eager and torch.compile.
3. ``train``        a bf16 llama3_1b (1.2 B parameters) trained for 30 steps with ``kernels=triton`` and
                    with ``kernels=torch``: tokens/s, MFU, and the two loss curves' agreement.
4. ``compiled``     the same bf16 llama3_1b run with ``train.compile=true`` (inductor, Triton kernels as custom
                    ops): tokens/s and MFU against the eager Triton run of part 3, and the loss curves' agreement.
5. ``equivalence``  with two or more GPUs: tp2, pp2 (gpipe, 1f1b, interleaved_1f1b, zb_h1, zbv, dualpipev), dp2, dp2 ZeRO-1/2
                    and compiled tp2 / pp2 zb_h1 launched on NCCL by torchrun, each against a serial run's
                    per-step loss and gradient norm.

A part that fails records the tail of its output and the next part runs; the exit status is 1 if any
part failed. Without a CUDA device (and without ``--dry-run``) it says so, writes nothing and exits 0.
``--dry-run`` runs the same parts on the CPU (kernels interpreted, a tiny model, gloo): it checks this
script, not the GPU, and its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data import is_prepared  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NO_CUDA_MESSAGE = ("gpu_check.py: no CUDA device is visible (torch.cuda.is_available() is False), so there is "
                   "nothing to check here and no report was written. On a CPU, `--dry-run` exercises this "
                   "script with tiny settings.")

# Two bf16 runs whose kernels round differently drift apart as AdamW amplifies tiny gradient differences;
# 2 % per step over a few dozen steps is loose enough for that drift and far tighter than any real bug
# (a wrong gradient shows within a step or two). The step-1 difference is reported too: it has no drift.
BF16_LOSS_RTOL = 2e-2
# fp32 equivalence launches: the CPU suites hold 1e-5 on the loss and 1e-4 on the gradient norm
# (tests/support/launch.py REL, GRAD_NORM_REL); on a GPU reductions run in other orders, so this stays
# at 1e-4 until measured there.
FP32_RTOL = 1e-4

# The small model of the equivalence launches (tests/support/launch.py SMALL_MODEL with 4 layers and tied
# embeddings, as tests/launch/test_pp_train.py: 4 layers give interleaved_1f1b two chunks per rank, and tying
# adds the embedding-gradient sum across the first and last stage).
SMALL_MODEL = ["model.dim=48", "model.n_layers=4", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_dim=72",
               "model.vocab_size=512", "model.tie_embeddings=true", "train.seq_len=32",
               "train.global_batch_size=8", "parallel.micro_batch_size=2", "optim.warmup_steps=3",
               "train.log_interval=1000"]
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2 gpipe": ["parallel.pp=2", "parallel.schedule=gpipe", "parallel.layers_per_stage=[3,1]"],
    "pp2 1f1b": ["parallel.pp=2", "parallel.schedule=1f1b"],
    "pp2 interleaved_1f1b": ["parallel.pp=2", "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
    "pp2 zb_h1": ["parallel.pp=2", "parallel.schedule=zb_h1"],
    "pp2 zbv": ["parallel.pp=2", "parallel.schedule=zbv", "parallel.virtual_stages=2"],
    "pp2 dualpipev": ["parallel.pp=2", "parallel.schedule=dualpipev", "parallel.virtual_stages=2"],
    "dp2": ["parallel.dp=2"],
    "dp2 zero1": ["parallel.dp=2", "optim.zero=1"],
    "dp2 zero2": ["parallel.dp=2", "optim.zero=2"],
    "tp2 compiled": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.compile=true"],
    "pp2 zb_h1 compiled": ["parallel.pp=2", "parallel.schedule=zb_h1", "train.compile=true"],
}


@dataclass(frozen=True)
class Settings:
    """What the parts run: the real sizes, or the dry run's tiny ones."""

    dry_run: bool
    budgets_s: dict[str, float]
    kernel_test_args: list[str]   # extra pytest arguments (the dry run selects a subset)
    bench_args: list[str]
    train_overrides: list[str]    # the kernels=triton vs kernels=torch training comparison
    train_vocab: int
    train_steps: int
    steady_from: int              # first step counted in tokens/s and MFU (earlier ones compile kernels)
    equiv_steps: int
    compile_backend: str          # train.compile_backend of the compiled part


REAL = Settings(
    dry_run=False,
    budgets_s={"kernels": 75, "bench": 75, "train": 180, "compiled": 120, "equivalence": 150},
    kernel_test_args=[],
    bench_args=[],
    # llama3_1b keeps its 128256-token vocabulary (the synthetic data matches it), so the cross-entropy kernel
    # runs at its real width; 2 micro-batches of 8 x 2048 tokens per step.
    train_overrides=["model=llama3_1b", "precision=bf16", "train.seq_len=2048", "train.global_batch_size=16",
                     "parallel.micro_batch_size=8", "optim.lr=3e-4", "optim.warmup_steps=5",
                     "train.log_interval=10"],
    train_vocab=128256,
    train_steps=30,
    steady_from=5,
    equiv_steps=10,
    compile_backend="inductor",
)
DRY = Settings(
    dry_run=True,
    budgets_s={"kernels": 300, "bench": 120, "train": 300, "compiled": 300, "equivalence": 600},
    kernel_test_args=["-k", "rms_norm_matches_reference or swiglu_matches_reference"],
    bench_args=["--dry-run", "--no-compile"],
    # one micro-batch of 2 x 16 tokens per step: the interpreter is slow
    train_overrides=[*(o for o in SMALL_MODEL if not o.startswith(("train.seq_len", "train.global_batch_size"))),
                     "precision=bf16", "train.seq_len=16", "train.global_batch_size=2"],
    train_vocab=512,
    train_steps=2,
    steady_from=1,
    equiv_steps=3,
    compile_backend="aot_eager",   # the dry run checks the script; inductor's C++ compile is slow on a CPU
)


# ---- results -----------------------------------------------------------------------------------------

@dataclass
class PartResult:
    """One part of the check, as the report shows it."""

    key: str
    title: str
    budget_s: float
    status: str = PASS
    seconds: float = 0.0
    headline: str = ""                                  # the summary table's numbers
    commands: list[str] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)
    details: str = ""                                   # Markdown shown under the numbers
    error: str = ""                                     # output tail of what failed


@dataclass
class Facts:
    date: str
    gpus: list[str]
    driver: str
    cuda: str
    torch: str
    triton: str
    python: str
    cpu: str


class PartFailed(Exception):
    """A part cannot go on (or its check failed); ``tail`` is the output that shows why."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


# ---- running commands --------------------------------------------------------------------------------

@dataclass
class Command:
    name: str                                           # its log file's stem
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)   # set on top of the base environment

    def shell(self) -> str:
        """As a user would type it from the repository root."""
        argv = ["python" if a == sys.executable else a for a in self.argv]
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(argv)])


@dataclass
class Completed:
    rc: int
    seconds: float
    timed_out: bool
    output: str

    def tail(self, lines: int = 60, chars: int = 5000) -> str:
        """The end of the output. torchrun's own traceback, printed last, only says that a worker failed: the
        tail ends at its first line ("failed (exitcode: ...) local_rank: ..."), after what the workers printed."""
        text = self.output.splitlines()
        cut = next((i for i, ln in enumerate(text) if _TORCHRUN_FAILED.search(ln)), None)
        if cut is not None:
            text = text[:cut + 1] + [ln for ln in text[cut + 1:] if ln.startswith("[gpu_check]")]
        return "\n".join(text[-lines:])[-chars:]


_TORCHRUN_FAILED = re.compile(r"elastic/multiprocessing/api\.py.*\] failed \(exitcode")


def base_env(dry_run: bool) -> dict[str, str]:
    # Compiled kernels unless a command asks for the interpreter: an inherited TRITON_INTERPRET=1 would
    # silently turn the GPU checks into CPU ones.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run is a CPU run even where a GPU is visible
    return env


def run_command(cmd: Command, *, env: dict[str, str], timeout: float, log: Path) -> Completed:
    """Run from the repository root, output to ``log``. On timeout the whole process group goes (a
    torchrun launcher and its workers), not only the launcher."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd.argv, cwd=ROOT, env={**env, **cmd.env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
    output = log.read_text(errors="replace")
    if timed_out:
        output += f"\n[gpu_check] stopped after {timeout:.0f} s: the part's time budget ran out"
    return Completed(proc.returncode, time.monotonic() - t0, timed_out, output)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM first (torchrun passes it on to its workers), then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass


class Check:
    """What the parts share: settings, the work directory, the GPUs and the current part's deadline."""

    def __init__(self, settings: Settings, work: Path, n_gpus: int, budget_scale: float):
        self.s = settings
        self.work = work
        self.n_gpus = n_gpus
        self.budget_scale = budget_scale
        self.env = base_env(settings.dry_run)
        self.deadline = float("inf")
        self.eager_runs: dict[str, list[dict]] = {}   # part `train`'s records, which part `compiled` compares with

    def run(self, cmd: Command, res: PartResult | None = None, *, check: bool = True) -> Completed:
        """Run within the current part's budget; a failure raises `PartFailed` unless ``check`` is off."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PartFailed(f"time budget spent before `{cmd.name}` could start")
        if res is not None:
            res.commands.append(cmd.shell())
        done = run_command(cmd, env=self.env, timeout=left, log=self.work / "logs" / f"{cmd.name}.log")
        if check and done.rc != 0:
            raise PartFailed(f"`{cmd.name}` {'timed out' if done.timed_out else f'exited {done.rc}'}", done.tail())
        return done

    def fresh_dir(self, name: str) -> Path:
        """An empty run directory: the trainer appends to metrics.jsonl, so a reused --work-dir would mix runs."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def gpu_groups(self, size: int) -> list[list[str] | None]:
        """Disjoint groups of ``size`` GPU ids for concurrent launches (ids as this process sees them
        mapped through an inherited CUDA_VISIBLE_DEVICES); one ``None`` group, the CPU, in a dry run."""
        if self.s.dry_run:
            return [None]
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = visible[:self.n_gpus] if visible else [str(i) for i in range(self.n_gpus)]
        return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


def train_command(name: str, overrides: list[str], *, nproc: int = 0, gpus: list[str] | None = None,
                  interpret: bool = False) -> Command:
    """``python scripts/train.py`` (nproc 0), or torchrun with ``nproc`` processes as in the README."""
    launcher = [sys.executable, "scripts/train.py"] if not nproc else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",  # the store binds a free port itself
        "scripts/train.py"]
    env = {}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return Command(name, [*launcher, *overrides], env)


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-step records of ``<run_dir>/metrics.jsonl`` (eval records left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise PartFailed(f"{path} was not written")
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def max_rel_diff(a: list[float], b: list[float]) -> tuple[float, int]:
    """The largest |a_i - b_i| / |b_i| and its 1-based step; infinite when the lengths differ or are 0."""
    if len(a) != len(b) or not a:
        return float("inf"), 0
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return diffs[worst], worst + 1


# ---- data --------------------------------------------------------------------------------------------

def write_synthetic_data(out_dir: Path, *, vocab_size: int, n_tokens: int, seed: int = 0) -> Path:
    """A prepared data directory in the flat ``tandem-data/1`` layout, which engine/data still reads
    (meta.json, train.bin, val.bin; no tokenizer.model, as
    nothing here decodes text) of learnable synthetic tokens at any vocabulary size.

    Documents are random sequences of phrases from a fixed bank of 2048, and phrase tokens follow a Zipf
    law over the whole vocabulary: a model learns the unigram law within a few steps and the phrases by
    copying, so the loss falls visibly in a few dozen steps. A real corpus would need a tokenizer of the
    model's vocabulary (128256 for llama3_1b); the stdlib one has 4096."""
    out_dir = Path(out_dir)
    if is_prepared(out_dir):
        return out_dir
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    lengths = rng.integers(8, 33, size=2048)
    bank_tokens = rng.permutation(vocab_size)[rng.choice(vocab_size, size=int(lengths.sum()), p=p / p.sum())]
    bank = np.split(bank_tokens, np.cumsum(lengths)[:-1])
    order = rng.integers(0, len(bank), size=n_tokens // 8 + 1)  # phrases hold >= 8 tokens: enough of them
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tokens = np.concatenate([bank[i] for i in order])[:n_tokens].astype(dtype)
    n_val = max(n_tokens // 100, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens[:-n_val].tofile(out_dir / "train.bin")
    tokens[-n_val:].tofile(out_dir / "val.bin")
    meta = {"format": "tandem-data/1", "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
            "train_tokens": int(n_tokens - n_val), "val_tokens": int(n_val), "corpus": "synthetic (gpu_check.py)",
            "corpus_files": 0, "eos_id": None}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))  # last: it marks the directory complete
    return out_dir


# ---- the parts ---------------------------------------------------------------------------------------

def part_kernels(ck: Check, res: PartResult) -> None:
    """tests/unit/test_kernels.py, compiled (the dry run interprets a subset)."""
    cmd = Command("kernel_tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "tests/unit/test_kernels.py", *ck.s.kernel_test_args],
                  {"TRITON_INTERPRET": "1"} if ck.s.dry_run else {})
    done = ck.run(cmd, res, check=False)
    counts = pytest_counts(done.output)
    res.numbers.update({k: str(n) for k, n in counts.items()})
    res.numbers["Triton"] = "interpreted (dry run)" if ck.s.dry_run else "compiled (TRITON_INTERPRET unset)"
    res.headline = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
    if done.rc != 0 or not counts.get("passed"):
        raise PartFailed(f"pytest exited {done.rc}", done.tail())


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": 44, "failed": 2, ...} from pytest's closing line (the last line that counts outcomes)."""
    summary = next((ln for ln in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed|errors?)\b", ln)), "")
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)\b", summary)}


def part_bench(ck: Check, res: PartResult) -> None:
    """scripts/bench_kernels.py; its goals are reported, not enforced (a slow kernel is not a broken one)."""
    done = ck.run(Command("bench_kernels", [sys.executable, "scripts/bench_kernels.py", *ck.s.bench_args],
                          {"TRITON_INTERPRET": "1"} if ck.s.dry_run else {}), res)
    device, table, verdicts = bench_summary(done.output)
    met = sum(not any(w in v for w in ("BELOW", "SLOWER", "ABOVE")) for v in verdicts)
    res.numbers.update({"device": device, "cases meeting every goal": f"{met} of {len(verdicts)}"})
    res.headline = f"{met} of {len(verdicts)} cases meet every goal"
    res.details = "\n".join([*table, "", "Goals (>= 85 % of copy bandwidth, no slower than torch.compile, "
                              "cross-entropy peak <= 1/4 of eager's):", "", *(f"- {v}" for v in verdicts)])
    if not verdicts:
        raise PartFailed("bench_kernels.py printed no verdicts", done.tail())


def bench_summary(output: str) -> tuple[str, list[str], list[str]]:
    """bench_kernels.py's device line, its Markdown table, and the verdict lines under "goals (...):"."""
    lines = output.splitlines()
    device = next((ln.removeprefix("device: ") for ln in lines if ln.startswith("device:")), "?")
    goals = next((i for i, ln in enumerate(lines) if ln.startswith("goals (")), len(lines))
    return device, [ln for ln in lines if ln.startswith("|")], [ln.strip() for ln in lines[goals + 1:]
                                                                if ln.startswith("  ")]


def _steady(records: list[dict], key: str, first: int) -> float | None:
    """Median of ``key`` from step ``first`` on (earlier steps compile kernels and warm the allocator)."""
    values = [r[key] for r in records if r["step"] >= first and r.get(key) is not None]
    return statistics.median(values) if values else None


def part_train(ck: Check, res: PartResult) -> None:
    """The same bf16 training run with kernels=triton and kernels=torch: speed and loss agreement."""
    s = ck.s
    data = write_synthetic_data(ck.work / f"data_v{s.train_vocab}", vocab_size=s.train_vocab,
                                n_tokens=4_000_000 if not s.dry_run else 20_000)
    runs, failures = {}, []
    for kernels in ("triton", "torch"):  # the torch run goes ahead even if the Triton one failed
        try:
            runs[kernels] = ck.eager_runs[kernels] = _train_once(ck, res, kernels, data)
        except PartFailed as e:
            failures.append(f"--- kernels={kernels}: {e}\n{e.tail}")
    if len(runs) == 2:
        worst, at = _compare_training(res, runs, s.steady_from)
        if not worst <= BF16_LOSS_RTOL:
            failures.append(f"--- loss curves differ by {worst:.2e} at step {at} (tolerance {BF16_LOSS_RTOL:.0e})")
    if failures:
        raise PartFailed("; ".join(f.splitlines()[0].lstrip("- ") for f in failures), "\n\n".join(failures))


def part_compiled(ck: Check, res: PartResult) -> None:
    """Part 3's bf16 run with compiled blocks (kernels=triton): speed against eager, and loss agreement."""
    s = ck.s
    data = write_synthetic_data(ck.work / f"data_v{s.train_vocab}", vocab_size=s.train_vocab,
                                n_tokens=4_000_000 if not s.dry_run else 20_000)
    recs = _train_once(ck, res, "triton", data, extra=["train.compile=true",
                                                       f"train.compile_backend={s.compile_backend}"], tag="compiled")
    tok_s, mfu = _steady(recs, "tokens_per_s", s.steady_from), _steady(recs, "mfu", s.steady_from)
    res.headline = f"compiled {tok_s:,.0f} tok/s" + ("" if mfu is None else f" (MFU {100 * mfu:.1f} %)")
    eager = ck.eager_runs.get("triton")
    if eager is None:
        res.headline += "; no eager run to compare (part `train` did not run or failed)"
        return
    worst, at = max_rel_diff([r["loss"] for r in recs], [r["loss"] for r in eager])
    speed = tok_s / _steady(eager, "tokens_per_s", s.steady_from)
    res.numbers["compiled / eager"] = f"{speed:.2f}x the tokens/s of the eager Triton run (part train)"
    res.numbers["loss agreement"] = f"max relative difference {worst:.2e} (step {at}); tolerance {BF16_LOSS_RTOL:.0e}"
    res.headline += f", {speed:.2f}x eager; losses within {worst:.1e}"
    if not worst <= BF16_LOSS_RTOL:
        raise PartFailed(f"compiled and eager loss curves differ by {worst:.2e} at step {at}")


def _train_once(ck: Check, res: PartResult, kernels: str, data: Path, *, extra: list[str] = (),
                tag: str = "") -> list[dict]:
    s = ck.s
    name = f"train_{kernels}" + (f"_{tag}" if tag else "")
    run_dir = ck.fresh_dir(name)
    cmd = train_command(name, [*s.train_overrides, f"kernels={kernels}", f"data.dir={data}",
                               f"run_dir={run_dir}", f"train.max_steps={s.train_steps}", *extra],
                        interpret=s.dry_run and kernels == "triton")
    done = ck.run(cmd, res)
    recs = read_metrics(run_dir)
    size = re.search(r"model ([\d.]+)M params", done.output)  # the trainer's first line
    millions = float(size[1]) if size else float("nan")
    res.numbers.setdefault("model", f"{millions / 1e3:.2f} B parameters" if millions >= 1e3
                           else f"{millions:.2f} M parameters")
    res.numbers.setdefault("run", f"{len(recs)} steps, precision=bf16, synthetic tokens of vocab {s.train_vocab}")
    tok_s, mfu = _steady(recs, "tokens_per_s", s.steady_from), _steady(recs, "mfu", s.steady_from)
    res.numbers[f"kernels={kernels}" + (f", {tag}" if tag else "")] = (
        f"{tok_s:,.0f} tokens/s, MFU {'n/a (no known peak)' if mfu is None else f'{100 * mfu:.1f} %'} (medians "
        f"from step {s.steady_from}); loss {recs[0]['loss']:.4f} at step 1, {recs[-1]['loss']:.4f} at step {len(recs)}")
    return recs


def _compare_training(res: PartResult, runs: dict[str, list[dict]], steady_from: int) -> tuple[float, int]:
    """Fills in the speed-up, the loss agreement and the per-step table; returns the worst difference."""
    tri, tor = ([r["loss"] for r in runs[k]] for k in ("triton", "torch"))
    worst, at = max_rel_diff(tri, tor)
    speed = {k: _steady(recs, "tokens_per_s", steady_from) for k, recs in runs.items()}
    mfu = _steady(runs["triton"], "mfu", steady_from)
    res.numbers["Triton speed-up"] = f"{speed['triton'] / speed['torch']:.2f}x the tokens/s of the torch kernels"
    res.numbers["loss agreement"] = (f"max relative difference {worst:.2e} (step {at}), at step 1 "
                                     f"{max_rel_diff(tri[:1], tor[:1])[0]:.2e}; tolerance {BF16_LOSS_RTOL:.0e} (bf16)")
    rows = [f"| {i} | {a:.4f} | {b:.4f} | {abs(a - b) / abs(b):.1e} |" for i, (a, b) in enumerate(zip(tri, tor), 1)]
    res.details = "\n".join(["| step | loss, triton | loss, torch | relative difference |", "|---:|---:|---:|---:|",
                              *rows])
    res.headline = (f"triton {speed['triton']:,.0f} tok/s" + ("" if mfu is None else f" (MFU {100 * mfu:.1f} %)") +
                    f", torch {speed['torch']:,.0f} tok/s; losses within {worst:.1e}")
    return worst, at


def part_equivalence(ck: Check, res: PartResult) -> None:
    """tp2, pp2 (every schedule) and dp2 on NCCL against a serial run, concurrently on disjoint GPU pairs."""
    s = ck.s
    if not s.dry_run and ck.n_gpus < 2:
        res.status, res.headline = SKIP, f"{ck.n_gpus} GPU visible; these launches need 2"
        return
    data = write_synthetic_data(ck.work / "data_v512", vocab_size=512, n_tokens=200_000)
    base = [*SMALL_MODEL, f"data.dir={data}", f"train.max_steps={s.equiv_steps}"]
    groups = ck.gpu_groups(2)
    # The serial run first and alone: it also fills Triton's cache for the launches after it.
    serial_dir = ck.fresh_dir("equiv_serial")
    ck.run(train_command("equiv_serial", [*base, f"run_dir={serial_dir}"], nproc=1,
                         gpus=groups[0][:1] if groups[0] else None), res)
    serial = read_metrics(serial_dir)
    free: queue.Queue = queue.Queue()
    for g in groups:
        free.put(g)

    def launch(name: str, extra: list[str]) -> tuple[Command, Completed]:
        gpus = free.get()
        try:
            run_dir = ck.fresh_dir(_run_name(name))
            cmd = train_command(_run_name(name), [*base, *extra, f"run_dir={run_dir}"], nproc=2, gpus=gpus)
            try:
                return cmd, ck.run(cmd, check=False)
            except PartFailed as e:  # the budget ran out before it could start: the others still report
                return cmd, Completed(-1, 0.0, True, str(e))
        finally:
            free.put(gpus)

    with ThreadPoolExecutor(len(groups)) as pool:
        futures = {name: pool.submit(launch, name, extra) for name, extra in LAYOUTS.items()}
    rows, failures = [], []
    for name, fut in futures.items():
        cmd, done = fut.result()
        res.commands.append(cmd.shell())
        ok, d_loss, d_norm = _compare(ck, name, done, serial)
        rows.append(f"| {name} | {cmd.env.get('CUDA_VISIBLE_DEVICES', 'cpu') or 'cpu'} | {PASS if ok else FAIL} "
                    f"| {d_loss} | {d_norm} | {done.seconds:.0f} |")
        if not ok and done.rc == 0:
            failures.append(f"--- {name}: ran, but differs from the serial run (see the table)")
        elif not ok:
            failures.append(f"--- {name} ({'timed out' if done.timed_out else f'exit {done.rc}'})\n"
                            f"{done.tail(30, 2500)}")
    passed = len(LAYOUTS) - len(failures)
    res.headline = f"{passed} of {len(LAYOUTS)} layouts match the serial run"
    res.numbers.update({"layouts matching serial": f"{passed} of {len(LAYOUTS)}",
                        "steps compared": str(len(serial)),
                        "tolerance": f"relative {FP32_RTOL:.0e} per step on loss and grad_norm (fp32)",
                        "backend": "gloo (dry run)" if s.dry_run else "NCCL"})
    res.details = ("| layout | GPUs | result | max rel. diff loss | max rel. diff grad_norm | wall s |\n"
                   "|---|---|---|---:|---:|---:|\n" + "\n".join(rows))
    if failures:
        raise PartFailed(f"{len(failures)} of {len(LAYOUTS)} layouts failed", "\n\n".join(failures))


def _run_name(layout: str) -> str:
    return "equiv_" + layout.replace(" ", "_")


def _compare(ck: Check, name: str, done: Completed, serial: list[dict]) -> tuple[bool, str, str]:
    """(matches, loss difference, grad-norm difference) of one launch against the serial records."""
    if done.rc != 0:
        return False, "-", "-"
    try:
        recs = read_metrics(ck.work / _run_name(name))
    except PartFailed:
        return False, "-", "-"
    d_loss, _ = max_rel_diff([r["loss"] for r in recs], [r["loss"] for r in serial])
    d_norm, _ = max_rel_diff([r["grad_norm"] for r in recs], [r["grad_norm"] for r in serial])
    return d_loss <= FP32_RTOL and d_norm <= FP32_RTOL, f"{d_loss:.1e}", f"{d_norm:.1e}"


PARTS: dict[str, tuple[str, Callable[[Check, PartResult], None]]] = {
    "kernels": ("Kernel tests (tests/unit/test_kernels.py)", part_kernels),
    "bench": ("Kernel benchmarks (scripts/bench_kernels.py)", part_bench),
    "train": ("bf16 training, Triton vs torch kernels", part_train),
    "compiled": ("bf16 training with compiled blocks vs eager", part_compiled),
    "equivalence": ("Equivalence launches: tp2, pp2 x 4 schedules, dp2 (ZeRO 0/1/2), compiled tp2 and pp2",
                    part_equivalence),
}


def run_part(ck: Check, key: str) -> PartResult:
    title, fn = PARTS[key]
    res = PartResult(key, title, ck.s.budgets_s[key] * ck.budget_scale)
    t0 = time.monotonic()
    ck.deadline = t0 + res.budget_s
    try:
        fn(ck, res)
    except PartFailed as e:
        res.status, res.error = FAIL, e.tail or str(e)
        res.headline = f"{e}" + (f" ({res.headline})" if res.headline else "")
    except Exception as e:  # noqa: BLE001 - a bug in one part must not stop the others
        res.status, res.error, res.headline = FAIL, traceback.format_exc()[-5000:], f"{type(e).__name__}: {e}"
    res.seconds = time.monotonic() - t0
    return res


# ---- machine facts -----------------------------------------------------------------------------------

_FACTS_SNIPPET = """
import json, platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f"not importable ({type(e).__name__})"
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda or "none", "triton": tv,
                  "python": platform.python_version(),
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))
"""


def machine_facts(dry_run: bool) -> Facts:
    """Asked of a child process, so this one never holds a CUDA context the launches would have to share."""
    env = base_env(dry_run)
    out = subprocess.run([sys.executable, "-c", _FACTS_SNIPPET], env=env, capture_output=True, text=True, timeout=120)
    try:
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # torch itself does not import: the parts will say why
        info = {}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        driver = smi.stdout.splitlines()[0].strip() if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        driver = "no nvidia-smi"
    cpu = next((ln.split(":", 1)[1].strip() for ln in _read_lines("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor() or "unknown")
    return Facts(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), gpus=info.get("gpus", []),
                 driver=driver, cuda=info.get("cuda", "?"), torch=info.get("torch", "?"),
                 triton=info.get("triton", "?"), python=info.get("python", platform.python_version()),
                 cpu=f"{cpu} ({os.cpu_count()} cores)")


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


# ---- the report --------------------------------------------------------------------------------------

def exit_status(results: list[PartResult]) -> int:
    return 1 if any(r.status == FAIL for r in results) else 0


def render_report(facts: Facts, results: list[PartResult], *, dry_run: bool, command: str) -> str:
    failed = [r for r in results if r.status == FAIL]
    total = sum(r.seconds for r in results)
    gpus = f"{facts.gpus[0]} x {len(facts.gpus)}" if facts.gpus else "none"
    if facts.gpus and len(set(facts.gpus)) > 1:
        gpus = ", ".join(facts.gpus)
    out = [f"# Tandem GPU check, {facts.date}", ""]
    if dry_run:
        out += ["**DRY RUN on a CPU** (`--dry-run`): tiny settings, kernels interpreted, gloo instead of NCCL. "
                "It checks gpu_check.py itself; its numbers say nothing about a GPU.", ""]
    out += [f"**Overall: {'FAIL' if failed else 'PASS'}** ({len(failed)} of {len(results)} parts failed; "
            f"{total:.0f} s in all). Command: `{command}`", "",
            "## Machine", "", "| | |", "|---|---|", f"| GPUs | {gpus} |",
            f"| driver / CUDA | {facts.driver} / {facts.cuda} |",
            f"| torch | {facts.torch} |", f"| triton | {facts.triton} |", f"| Python | {facts.python} |",
            f"| CPU | {facts.cpu} |", f"| date | {facts.date} |", "",
            "## Summary", "", "| part | result | wall s | budget s | numbers |", "|---|---|---:|---:|---|"]
    # a headline may quote an error message: a "|" or a line break in it would break the table
    cell = lambda text: " ".join(text.split()).replace("|", "\\|")  # noqa: E731
    out += [f"| {r.title} | {r.status} | {r.seconds:.0f} | {r.budget_s:.0f} | {cell(r.headline)} |" for r in results]
    out += ["", "Every command runs from the repository root with `PYTHONPATH` set to it and TRITON_INTERPRET "
            "unset unless shown."]
    for i, r in enumerate(results, 1):
        out += ["", f"## {i}. {r.title}: {r.status}", "", f"{r.seconds:.1f} s of a {r.budget_s:.0f} s budget.", ""]
        if r.commands:
            out += ["```bash", *r.commands, "```", ""]
        out += [f"- {k}: {v}" for k, v in r.numbers.items()]
        if r.details:
            out += ["", r.details]
        if r.error:
            out += ["", "Output tail of what failed:", "", "```text", r.error.rstrip().replace("```", "'''"), "```"]
    return "\n".join(out) + "\n"


# ---- entry point -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="report path (default gpu_check_report.md; gpu_check_dry_run_report.md with --dry-run)")
    p.add_argument("--dry-run", "--cpu-smoke", action="store_true", help="tiny settings on the CPU: checks this script")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    p.add_argument("--work-dir", type=Path, default=None, help="run directories and logs (default: a new temp dir)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--only: unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        return 0
    settings = DRY if args.dry_run else REAL
    n_gpus = 0 if args.dry_run else torch.cuda.device_count()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tandem_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or Path("gpu_check_dry_run_report.md" if args.dry_run else "gpu_check_report.md")
    where = "dry run on the CPU" if args.dry_run else f"{n_gpus} CUDA device(s)"
    print(f"gpu_check: {where}; logs in {work}", flush=True)
    facts = machine_facts(args.dry_run)
    ck = Check(settings, work, n_gpus, args.budget_scale)
    results = []
    for key in [k for k in PARTS if k in args.only.split(",")]:
        print(f"[{key}] running (budget {settings.budgets_s[key] * args.budget_scale:.0f} s)", flush=True)
        results.append(run_part(ck, key))
        r = results[-1]
        print(f"[{key}] {r.status} in {r.seconds:.0f} s: {r.headline}", flush=True)
    command = shlex.join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    out.write_text(render_report(facts, results, dry_run=args.dry_run, command=command))
    status = exit_status(results)
    print(f"gpu_check: {'FAIL' if status else 'PASS'}; report written to {out}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
