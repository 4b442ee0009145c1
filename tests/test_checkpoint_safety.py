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
from models.init import ShardMeta
from tests.launch import SMALL_MODEL, losses, read_metrics, train_in_process


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
    from tests.ckpt_world import save_twice_second_fails_on_rank
    from tests.distributed import run_distributed

    t0 = time.time()
    out = run_distributed(save_twice_second_fails_on_rank, world_size=2, args=(str(tmp_path), 1), timeout=120)
    assert time.time() - t0 < 60
    for rank, message in enumerate(out):
        assert "rank 1" in message and "No space left on device" in message and "rank_00001.safetensors" in message, \
            (rank, message)
    assert latest(tmp_path) == "step_000001" and names(tmp_path) == ["step_000001"]
    ckpt.check_intact(tmp_path / "step_000001")
    assert not (tmp_path / "step_000002.tmp").exists()
