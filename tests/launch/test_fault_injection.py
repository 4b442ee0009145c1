"""SIGKILL of every process of a two-rank launch that saves every step, at random moments, several
times over; each relaunch resumes with `checkpoint.resume=auto` (taking over the dead launch's lock)
and the finished run's losses are bit-identical to an uninterrupted one. Every other kill runs with
asynchronous saves, so some land in the middle of a background write."""
import os
import random
import signal
import time

from engine import checkpoint as ckpt
from tests.support.launch import SMALL_MODEL, grad_norms, losses, read_metrics, start_torchrun, torchrun

STEPS = 30  # three kills land by about step 21 even on a fast machine (each launch runs ~2 + up to ~5 steps)


def test_sigkill_of_all_ranks_at_random_moments_then_exact_resume(data_dir, tmp_path):
    base = [*SMALL_MODEL, f"data.dir={data_dir}", f"train.max_steps={STEPS}", "parallel.dp=2", "optim.zero=1",
            "checkpoint.interval=1", "checkpoint.keep_last=2"]
    rng = random.Random(18)
    run = tmp_path / "run"
    kills = []
    for attempt in range(3):
        done = len(read_metrics(run)) if (run / "metrics.jsonl").exists() else 0
        extra = ["checkpoint.resume=auto", f"checkpoint.async_save={attempt % 2 == 1}"]
        proc, workers = start_torchrun(2, run, [*base, *extra], after_steps=done + 2)
        time.sleep(rng.uniform(0.0, 0.4))
        for pid in [proc.pid, *workers]:  # the launcher and every rank, with no chance to clean up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=60)
        kills.append(max((r["step"] for r in read_metrics(run)), default=0))
    assert kills[-1] < STEPS, kills  # the launches really were cut short
    torchrun(2, [*base, f"run_dir={run}", "checkpoint.resume=auto"])
    ref = tmp_path / "ref"
    torchrun(2, [*base, f"run_dir={ref}"])
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, STEPS + 1)), steps  # each step once: superseded records were dropped
    assert losses(read_metrics(run)) == losses(read_metrics(ref))  # bit-identical continuation
    assert grad_norms(read_metrics(run)) == grad_norms(read_metrics(ref))
    root = run / "checkpoints"
    for p in ckpt.list_checkpoints(root):
        ckpt.check_intact(p)
    assert [p.name for p in ckpt.list_checkpoints(root)][-1] == f"step_{STEPS:06d}"
    assert not [p for p in root.iterdir() if p.name.endswith((".tmp", ".old"))]
