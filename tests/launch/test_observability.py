"""Observability (issue 14): the metrics mirrored to TensorBoard, per-rank peak memory, and
torch.profiler Chrome traces of chosen steps."""
import importlib.util
import json

import pytest
import torch

from engine.config import ConfigError, validate
from engine.metrics import MetricsLog, PeakMemory, scalars
from engine.profiling import trace_path
from tests.support.launch import SMALL_MODEL, compose, read_metrics, train_in_process


def args(data_dir, run_dir, *extra):
    return [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={run_dir}", *extra]


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})   # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_peak_memory_and_profile_trace_of_one_run(data_dir, tmp_path):
    """One 3-step run with metrics.tensorboard=true, profile.steps=[2,3] and an eval at step 3: the
    event file holds exactly metrics.jsonl's numbers, each record carries this rank's peak memory, and
    the trace of steps 2..3 is Chrome-trace JSON. A resume from step 2 keeps the two in step."""
    run = tmp_path / "run"
    records = train_in_process(args(data_dir, run, "train.max_steps=3", "metrics.tensorboard=true",
                                    "profile.steps=[2,3]", "eval.interval=3", "eval.batches=1",
                                    "checkpoint.interval=2"))
    logged = read_metrics(run)
    assert logged == records and len(logged) == 4   # 3 steps and an eval
    assert_tensorboard_holds(run, logged)

    steps = [r for r in logged if "loss" in r]
    assert all(len(r["peak_mem_mib"]) == 1 and r["peak_mem_mib"][0] > 10 for r in steps), steps  # torch alone > 10 MiB

    trace = trace_path(run, 0, [2, 3])
    events = json.loads(trace.read_text())["traceEvents"]
    labels = {e.get("name") for e in events}
    assert {"step 2", "step 3"} <= labels and "step 1" not in labels, sorted(l for l in labels if "step" in str(l))
    assert any(str(e.get("name", "")).startswith("aten::") for e in events)   # the ops, not just the labels

    # resuming from step 2 abandons step 3: metrics.jsonl drops its record, TensorBoard purges its events
    train_in_process(args(data_dir, run, "train.max_steps=3", "metrics.tensorboard=true", "eval.interval=3",
                          "eval.batches=1", f"checkpoint.resume={run / 'checkpoints' / 'step_000002'}"))
    relogged = read_metrics(run)
    assert [r["step"] for r in relogged] == [1, 2, 3, 3] and relogged[:2] == logged[:2]
    assert_tensorboard_holds(run, relogged)

    # evaluating a checkpoint of the run (eval_only with resume) truncates nothing, so it purges nothing
    train_in_process(args(data_dir, run, "train.max_steps=3", "metrics.tensorboard=true", "eval.batches=1",
                          "train.eval_only=true", f"checkpoint.resume={run / 'checkpoints' / 'step_000002'}"))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 3, 2]
    assert [s for s, _ in tensorboard_scalars(run / "tensorboard")["loss"]] == [1, 2, 3]


def assert_tensorboard_holds(run, logged: list[dict]) -> None:
    """The event files hold exactly the records' numbers, step by step (float32, as TensorBoard
    stores them)."""
    want: dict[str, list[tuple[int, float]]] = {}
    for rec in logged:
        for tag, value in scalars(rec).items():
            want.setdefault(tag, []).append((rec["step"], value))
    got = tensorboard_scalars(run / "tensorboard")
    assert set(got) == set(want) and {"loss", "eval_loss", "grad_norm", "lr", "peak_mem_mib/max"} <= set(got)
    for tag, series in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in series], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-30), tag


def test_peak_memory_sees_a_transient_allocation_and_resets():
    """On a CPU the peak is the resident set's high-water mark (VmHWM), reset at each reading."""
    mem = PeakMemory(torch.device("cpu"))
    base = mem.take()
    x = torch.ones(64 * 2**20 // 4)   # 64 MiB, touched
    del x
    peak = mem.take()
    assert peak >= base + 60, (base, peak)
    assert mem.take() < peak - 50   # the 64 MiB are gone and the reset took


def test_tensorboard_missing_and_bad_profile_steps_are_clear_errors(tmp_path, monkeypatch):
    cfg = compose(args(tmp_path / "data", tmp_path / "run", "metrics.tensorboard=true"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"metrics.tensorboard=true .*`pip install tensorboard`"):
        validate(cfg)
    for steps in ("[3,2]", "[0,1]", "[1]", "[5,300]"):
        with pytest.raises(ConfigError, match=r"profile.steps=.* must be \[first, last\]"):
            validate(compose(args(tmp_path / "data", tmp_path / "run", f"profile.steps={steps}",
                                  "train.max_steps=200")))


def test_per_rank_peak_memory_reaches_tensorboard_as_max_argmax_mean():
    """At 1k+ ranks one tag per rank would swamp TensorBoard: it gets the max, its rank and the mean
    (metrics.jsonl keeps the list); other lists stay per index."""
    got = scalars({"step": 4, "loss": 2.0, "peak_mem_mib": [10.0, 40.0, 30.0, 40.0], "source_epochs": [0.5, 0.25],
                   "skipped": False, "mfu": None})
    assert got == {"loss": 2.0, "peak_mem_mib/max": 40.0, "peak_mem_mib/argmax": 1.0, "peak_mem_mib/mean": 30.0,
                   "source_epochs/0": 0.5, "source_epochs/1": 0.25, "skipped": 0.0}


def test_metrics_log_creates_nothing_before_the_first_record(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl", tensorboard_dir=tmp_path / "run" / "tensorboard", purge_step=3)
    log.close()
    assert not (tmp_path / "run").exists()   # no event file, no purge marker for a launch that wrote nothing


def test_close_releases_the_run_dir_even_when_closing_fails(data_dir, tmp_path, monkeypatch, capfd):
    """A failure while closing (here the profiler's) neither skips the lock release and the removal of
    a failed launch's empty run directory, nor replaces the error that failed the launch; with
    metrics.tensorboard=true the failed fresh launch still leaves no directory (the event writer is
    created with the first record). Without an error in flight, the close failure is raised."""
    from engine.profiling import StepProfiler
    from engine.run_dir import LOCK
    from engine.trainer import Trainer

    def fail(what):
        def raiser(*a, **k):
            raise RuntimeError(what)
        return raiser

    monkeypatch.setattr(StepProfiler, "close", fail("profiler close failed"))
    real_start = Trainer._start_history
    monkeypatch.setattr(Trainer, "_start_history", fail("the launch failed"))
    run = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError, match="the launch failed"):
        train_in_process(args(data_dir, run, "train.max_steps=1", "metrics.tensorboard=true"))
    assert "closing the profiler after the error below failed too: RuntimeError: profiler close failed" in \
        capfd.readouterr().err
    assert not (tmp_path / "new").exists()

    monkeypatch.setattr(Trainer, "_start_history", real_start)
    with pytest.raises(RuntimeError, match="profiler close failed"):
        train_in_process(args(data_dir, run, "train.max_steps=1", "metrics.tensorboard=true"))
    assert not (run / LOCK).exists() and [r["step"] for r in read_metrics(run)] == [1]
