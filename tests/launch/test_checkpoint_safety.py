"""Long runs never lose work: rotation by step number, the abandoned history, durable saves, falling
back past a damaged checkpoint, fail-fast save errors, the NaN guard, the run-directory lock,
prompt shutdown and the data settings a resume must keep."""
import json
import os
import shutil
import time

import pytest
import torch

from engine import checkpoint as ckpt
from engine import run_dir as rundir
from models.shard import ShardMeta
from tests.support.launch import SMALL_MODEL, grad_norms, losses, read_metrics, train_in_process


def args(data_dir, run_dir, *extra):
    return [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={run_dir}", *extra]


def names(root):
    return [p.name for p in ckpt.list_checkpoints(root)]


def latest(root):
    return (root / "latest").read_text().strip()


def tiny_save(root, step, value=1.0, **kw):
    t = torch.full((2, 3), value)
    return ckpt.save(root, step, [ckpt.Entry("model/w", t, ShardMeta.full((2, 3)))], model_config={}, layout={},
                     train_state={"step": step}, **kw)


# -- 1. rotation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twelve_steps(data_dir, tmp_path_factory):
    """12 steps saving every 3, keeping everything: step_000003 .. step_000012."""
    run = tmp_path_factory.mktemp("twelve")
    train_in_process(args(data_dir, run, "train.max_steps=12", "checkpoint.interval=3", "checkpoint.keep_last=0"))
    return run


@pytest.mark.parametrize("keep_last, kept", [(1, ["step_000006", "step_000007"]),
                                              (3, ["step_000003", "step_000006", "step_000007"])])
def test_resume_from_an_older_step_keeps_the_new_save_and_moves_the_abandoned_history(
        data_dir, tmp_path, twelve_steps, keep_last, kept):
    """The issue's scenario: resume from step 6 of a 12-step history and stop at 7. The save of 7 and
    the resume point survive rotation; 9 and 12 (the abandoned future) move to abandoned/, so
    resume=auto continues from 7, and metrics.jsonl holds each step once."""
    run = tmp_path / "run"
    shutil.copytree(twelve_steps, run)
    root = run / "checkpoints"
    train_in_process(args(data_dir, run, "train.max_steps=12", "train.stop_at=7", f"checkpoint.keep_last={keep_last}",
                          f"checkpoint.resume={root / 'step_000006'}"))
    assert names(root) == kept
    assert latest(root) == "step_000007"
    assert sorted(p.name for p in (root / "abandoned").iterdir()) == ["step_000009", "step_000012"]
    assert ckpt.resolve(root, "auto") == root / "step_000007"
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 8))


def test_step_numbers_past_a_million_rotate_by_number_not_name(tmp_path):
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        tiny_save(tmp_path, step, keep_last=2)
    assert names(tmp_path) == ["step_1000000", "step_1000001"]  # "step_999999" sorts after them as a name
    assert latest(tmp_path) == "step_1000001"
    assert ckpt.resolve(tmp_path, "auto") == tmp_path / "step_1000001"
    assert ckpt.parse_step("step_1000001") == 1_000_001 and ckpt.parse_step("step_000004.tmp") is None


def test_rotation_never_deletes_the_protected_resume_point(tmp_path):
    for step in (2, 4):
        tiny_save(tmp_path, step)
    tiny_save(tmp_path, 6, keep_last=1, protect=("step_000002",))
    assert names(tmp_path) == ["step_000002", "step_000006"]


def test_keep_last_negative_is_an_error_naming_the_key(data_dir, tmp_path):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint.keep_last=-1 must not be negative"):
        train_in_process(args(data_dir, tmp_path / "r", "checkpoint.keep_last=-1"))
    assert not (tmp_path / "r").exists()


# -- 2. durability -------------------------------------------------------------------------------
def test_every_file_is_fsynced_before_its_checksum(tmp_path, monkeypatch):
    events = []
    fsync_file, sha = ckpt._fsync_file, ckpt.sha256_file
    monkeypatch.setattr(ckpt, "_fsync_file", lambda p: (events.append(("fsync", p.name)), fsync_file(p)))
    monkeypatch.setattr(ckpt, "sha256_file", lambda p: (events.append(("sha", p.name)), sha(p))[1])
    dirs = []
    fsync_dir = ckpt._fsync_dir
    monkeypatch.setattr(ckpt, "_fsync_dir", lambda p: (dirs.append(p), fsync_dir(p)))
    tiny_save(tmp_path, 1)
    assert events == [("fsync", "rank_00000.safetensors"), ("sha", "rank_00000.safetensors")]
    assert tmp_path in dirs  # the root, after the rename into place and after `latest`


def test_resaving_a_step_swaps_atomically_and_a_crash_in_between_recovers(tmp_path):
    tiny_save(tmp_path, 5, value=1.0)
    tiny_save(tmp_path, 5, value=2.0)
    assert names(tmp_path) == ["step_000005"] and not (tmp_path / "step_000005.old").exists()
    # a crash after the old directory was moved aside, before the new one was renamed in
    os.replace(tmp_path / "step_000005", tmp_path / "step_000005.old")
    (tmp_path / "step_000005.tmp").mkdir()
    ckpt.recover(tmp_path)
    assert names(tmp_path) == ["step_000005"] and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000005"]
    t = torch.empty(2, 3)
    ckpt.load(tmp_path / "step_000005", [ckpt.Entry("model/w", t, ShardMeta.full((2, 3)))])
    assert bool((t == 2.0).all())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint_and_says_so(data_dir, tmp_path, capfd, damage):
    run = tmp_path / "run"
    train_in_process(args(data_dir, run, "train.max_steps=4", "checkpoint.interval=2"))
    f = run / "checkpoints" / "step_000004" / "rank_00000.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    f.write_bytes(bytes(data[: len(data) // 2] if damage == "truncate" else data))
    capfd.readouterr()
    resumed = train_in_process(args(data_dir, run, "train.max_steps=5", "checkpoint.resume=auto"))
    err = capfd.readouterr().err
    assert "warning: skipping checkpoint" in err and "step_000004" in err and "checksum" in err, err
    assert [r["step"] for r in resumed] == [3, 4, 5]  # continued from step_000002


# -- 3. fail fast --------------------------------------------------------------------------------
def test_a_save_failing_on_one_rank_of_two_fails_both_at_once(tmp_path):
    from tests.support.ckpt_world import save_twice_second_fails_on_rank
    from tests.support.distributed import run_distributed

    t0 = time.time()
    out = run_distributed(save_twice_second_fails_on_rank, world_size=2, args=(str(tmp_path), 1), timeout=120)
    assert time.time() - t0 < 60
    for rank, message in enumerate(out):
        assert "rank 1" in message and "No space left on device" in message and "rank_00001.safetensors" in message, \
            (rank, message)
    assert latest(tmp_path) == "step_000001" and names(tmp_path) == ["step_000001"]
    ckpt.check_intact(tmp_path / "step_000001")
    assert not (tmp_path / "step_000002.tmp").exists()


# -- 4. NaN guard --------------------------------------------------------------------------------
def _poison_gradients(monkeypatch, at_calls):
    """From the trainer's gradient sync, fill the first gradient with NaN on the given calls (1-based)."""
    from engine import trainer

    real, calls = trainer.sync_grads, []

    def sync(chunks, mesh, reducer):
        real(chunks, mesh, reducer)
        calls.append(1)
        if len(calls) in at_calls:
            p = next(q for q in chunks[0].parameters() if q.grad is not None)
            p.grad.fill_(float("nan"))

    monkeypatch.setattr(trainer, "sync_grads", sync)


def _model_tensors(path, fname="rank_00000.safetensors"):
    from safetensors.torch import load_file

    return load_file(path / fname)


def test_a_nan_gradient_skips_the_update_and_is_counted(data_dir, tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, {3})
    recs = train_in_process(args(data_dir, tmp_path, "train.max_steps=5", "checkpoint.interval=1",
                                 "checkpoint.keep_last=0"))
    assert [r["skipped"] for r in recs] == [False, False, True, False, False]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1]
    assert recs[2]["grad_norm"] != recs[2]["grad_norm"]  # NaN, reported as such
    assert all(r["loss"] == r["loss"] for r in recs)
    root = tmp_path / "checkpoints"
    before, after = _model_tensors(root / "step_000002"), _model_tensors(root / "step_000003")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # no update
    assert not torch.equal(after["model/output.weight"], _model_tensors(root / "step_000004")["model/output.weight"])
    assert read_metrics(tmp_path)[2]["skipped"] is True


def test_consecutive_non_finite_steps_stop_the_run_with_a_clear_error(data_dir, tmp_path, monkeypatch):
    from engine.trainer import TrainingDiverged

    _poison_gradients(monkeypatch, {2, 3, 4, 5})
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(up to step 4\).*train.max_skipped_steps=3"):
        train_in_process(args(data_dir, tmp_path, "train.max_steps=8", "train.max_skipped_steps=3",
                              "checkpoint.interval=1"))
    for p in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        assert all(bool(torch.isfinite(t).all()) for t in _model_tensors(p).values())


def test_non_finite_weights_are_never_saved(tmp_path):
    tiny_save(tmp_path, 1)
    with pytest.raises(ckpt.SaveFailed, match="model/w holds non-finite values"):
        tiny_save(tmp_path, 2, value=float("inf"))
    assert names(tmp_path) == ["step_000001"] and latest(tmp_path) == "step_000001"


# -- 5. one launch per run directory --------------------------------------------------------------
def test_a_second_live_launch_on_a_locked_run_dir_fails_at_once(data_dir, tmp_path):
    held = rundir.RunLock(tmp_path)
    held.acquire()  # this (live) process stands for the first launch
    try:
        t0 = time.time()
        with pytest.raises(rundir.RunDirLocked, match=rf"is in use by another launch \(pid {os.getpid()} on this host"):
            train_in_process(args(data_dir, tmp_path, "train.max_steps=2"))
        assert time.time() - t0 < 30 and not (tmp_path / "metrics.jsonl").exists()
    finally:
        held.release()


def test_a_stale_lock_of_a_dead_process_is_taken_over(data_dir, tmp_path, capfd):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    recs = train_in_process(args(data_dir, tmp_path, "train.max_steps=1"))
    assert len(recs) == 1 and "taking over the stale lock" in capfd.readouterr().err
    assert not (tmp_path / rundir.LOCK).exists()  # released at the end


# -- 6. prompt, bounded shutdown ------------------------------------------------------------------
def test_a_stop_signal_during_a_step_stops_at_the_end_of_that_step(data_dir, tmp_path, monkeypatch):
    import signal

    from engine.trainer import Trainer

    real = Trainer._forward_backward

    def run(self, read, *, backward):
        if backward and self.step == 2:  # inside step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, read, backward=backward)

    monkeypatch.setattr(Trainer, "_forward_backward", run)
    recs = train_in_process(args(data_dir, tmp_path, "train.max_steps=50"))
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert names(tmp_path / "checkpoints") == ["step_000003"]


def test_a_second_interrupt_exits_at_once_even_while_blocked(tmp_path):
    import subprocess
    import sys

    from tests.support.launch import ROOT

    script = ("import os, signal, time\n"
              "from engine.trainer import StopSignal\n"
              "with StopSignal() as s:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(0.5)\n"
              "    assert s.requested and s.interrupts == 1, (s.requested, s.interrupts)\n"
              "    print('first interrupt: stop requested', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    r, w = os.pipe()\n"
              "    os.read(r, 1)  # blocks for ever, like a rank stuck in a collective\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 130, proc.stderr
    assert "first interrupt: stop requested" in proc.stdout and "second interrupt: exiting now" in proc.stderr
    assert time.time() - t0 < 30


# -- 7. resume keeps the data settings ------------------------------------------------------------
def test_resume_with_changed_data_settings_is_refused_naming_the_keys(data_dir, tmp_path):
    from engine.config import ConfigError

    train_in_process(args(data_dir, tmp_path, "train.max_steps=4", "train.stop_at=2"))
    for change, key in (("train.seed=1", "train.seed=1"), ("train.global_batch_size=16", "train.global_batch_size=16")):
        with pytest.raises(ConfigError, match=rf"{key} \(checkpoint: .*allow_data_change=true"):
            train_in_process(args(data_dir, tmp_path, "train.max_steps=4", "checkpoint.resume=auto", change))
    recs = train_in_process(args(data_dir, tmp_path, "train.max_steps=4", "checkpoint.resume=auto", "train.seed=1",
                                  "checkpoint.allow_data_change=true"))
    assert [r["step"] for r in recs] == [3, 4]


# -- 9. asynchronous saves -------------------------------------------------------------------------
def _manifests(root):
    return {p.name: (p / "manifest.json").read_text() for p in ckpt.list_checkpoints(root)}


def test_async_saves_write_exactly_what_sync_saves_write_dp2(data_dir, tmp_path):
    """Two ranks (dp=2, ZeRO-1: both write), saving every step, sync and async in one gloo world: the
    same losses, manifests and tensors (file checksums aside: safetensors orders its header metadata
    differently in every process). The async writer agrees over its own gloo group while training
    runs its collectives."""
    from tests.support.distributed import run_distributed
    from tests.support.trainer_world import run_trainers

    base = [*SMALL_MODEL, f"data.dir={data_dir}", "train.max_steps=4", "checkpoint.interval=1",
            "checkpoint.keep_last=2", "parallel.dp=2", "optim.zero=1"]
    runs = {mode: [*base, f"run_dir={tmp_path / mode}", f"checkpoint.async_save={mode == 'async'}"]
            for mode in ("sync", "async")}
    out = run_distributed(run_trainers, world_size=2, args=(runs,), timeout=600)
    for rank_out in out:   # every rank returns the global loss and norm
        assert losses(rank_out["sync"]) == losses(rank_out["async"])
        assert grad_norms(rank_out["sync"]) == grad_norms(rank_out["async"])
    sync, async_ = _manifests(tmp_path / "sync" / "checkpoints"), _manifests(tmp_path / "async" / "checkpoints")
    assert list(sync) == list(async_) == ["step_000003", "step_000004"]
    for name in sync:
        a, b = json.loads(sync[name]), json.loads(async_[name])
        assert sorted(a["files"]) == sorted(b["files"]) == ["rank_00000.safetensors", "rank_00001.safetensors"]
        for m in (a, b):
            m["files"] = {f: info["bytes"] for f, info in m["files"].items()}
        assert a == b
        for f in a["files"]:
            ta = _model_tensors(tmp_path / "sync" / "checkpoints" / name, f)
            tb = _model_tensors(tmp_path / "async" / "checkpoints" / name, f)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        ckpt.check_intact(tmp_path / "async" / "checkpoints" / name)
    assert latest(tmp_path / "async" / "checkpoints") == "step_000004"


def test_async_save_returns_after_the_host_copy_and_the_next_save_waits(tmp_path, monkeypatch):
    from engine.checkpoint_saver import Checkpointer

    real = ckpt.save_file

    def slow(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", slow)
    w = torch.ones(2, 3)
    entries = [ckpt.Entry("model/w", w, ShardMeta.full((2, 3)))]
    saver = Checkpointer(tmp_path, keep_last=1, async_save=True)
    t0 = time.time()
    saver.save(1, entries, model_config={}, layout={}, train_state={"step": 1})
    assert time.time() - t0 < 0.5 and saver.in_flight
    w.fill_(7.0)  # training goes on: the save holds its own copy
    saver.save(2, entries, model_config={}, layout={}, train_state={"step": 2})  # waits for step 1 first
    assert (tmp_path / "step_000001" / "manifest.json").is_file()
    saver.wait()
    assert names(tmp_path) == ["step_000002"] and latest(tmp_path) == "step_000002"
    t = torch.empty(2, 3)
    ckpt.load(tmp_path / "step_000002", [ckpt.Entry("model/w", t, ShardMeta.full((2, 3)))])
    assert bool((t == 7.0).all())


def test_a_failed_background_save_stops_training_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    real = ckpt.save_file

    def fail_at_step_4(tensors, path, **k):
        if "step_000004" in str(path):
            raise OSError(28, "No space left on device")
        return real(tensors, path, **k)

    monkeypatch.setattr(ckpt, "save_file", fail_at_step_4)
    with pytest.raises(ckpt.SaveFailed, match=r"step 4 failed \(rank 0: OSError writing .*No space left on device"):
        train_in_process(args(data_dir, tmp_path, "train.max_steps=8", "checkpoint.interval=2",
                              "checkpoint.async_save=true"))
    root = tmp_path / "checkpoints"
    assert names(root) == ["step_000002"] and latest(root) == "step_000002"
    ckpt.check_intact(root / "step_000002")
    assert max(r["step"] for r in read_metrics(tmp_path)) <= 6  # stopped within a step or two of the failure


def test_overwrite_discards_the_old_run_only_when_asked(data_dir, tmp_path):
    from engine.config import ConfigError

    train_in_process(args(data_dir, tmp_path, "train.max_steps=2", "checkpoint.interval=2"))
    with pytest.raises(ConfigError, match="already holds checkpoints .*checkpoint.overwrite=true"):
        train_in_process(args(data_dir, tmp_path, "train.max_steps=1"))
    assert names(tmp_path / "checkpoints") == ["step_000002"]
    train_in_process(args(data_dir, tmp_path, "train.max_steps=1", "checkpoint.overwrite=true"))
    assert names(tmp_path / "checkpoints") == [] and not (tmp_path / "checkpoints" / "latest").exists()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # the old run's records are gone too
