"""The training launch under tensor parallelism: same losses as serial, checkpoints across tp sizes."""
import shutil

import pytest

from tests.support.launch import SMALL_MODEL, assert_runs_match, read_metrics, torchrun, train_in_process

STEPS, SAVE_AT = 10, 5
# SMALL_MODEL with 8 query heads (head_dim 6) so tp=4 splits it: 2 KV heads replicated on 2 ranks each;
# tied embeddings, so under pipeline parallelism the vocab-parallel embedding and head live on different stages.
MODEL = [o for o in SMALL_MODEL if not o.startswith("model.n_heads=")] + ["model.n_heads=8", "model.tie_embeddings=true"]


def _args(data_dir, run_dir, *extra):
    return [*MODEL, f"data.dir={data_dir}", f"run_dir={run_dir}", f"train.max_steps={STEPS}", *extra]


@pytest.fixture(scope="module")
def serial(serial_run):
    return serial_run(MODEL, STEPS)


@pytest.fixture(scope="module")
def tp2_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2")
    torchrun(2, _args(data_dir, run, "parallel.tp=2", f"checkpoint.interval={SAVE_AT}"))
    return run


def test_tp2_launch_matches_serial(tp2_run, serial):
    assert_runs_match(read_metrics(tp2_run), serial)


def test_tp2_checkpoint_stores_global_tensors(tp2_run):
    import json

    manifest = json.loads((tp2_run / "checkpoints" / f"step_{SAVE_AT:06d}" / "manifest.json").read_text())
    assert manifest["layout"]["tp"] == 2
    wq = manifest["tensors"]["model/layers.0.attention.wq.weight"]
    assert wq["global_shape"] == [48, 48] and sorted(s["offset"][0] for s in wq["slices"]) == [0, 24]
    norm = manifest["tensors"]["model/norm.weight"]
    assert len(norm["slices"]) == 1  # replicated over tp: written once


def test_tp2_checkpoint_resumes_at_tp1(tp2_run, data_dir, tmp_path):
    src = tp2_run / "checkpoints" / f"step_{SAVE_AT:06d}"
    recs = train_in_process(_args(data_dir, tmp_path, f"checkpoint.resume={src}"))
    assert [r["step"] for r in recs] == list(range(SAVE_AT + 1, STEPS + 1))
    assert_runs_match(recs, read_metrics(tp2_run)[SAVE_AT:])


def test_tp2_checkpoint_resumes_at_tp4_with_sequence_parallelism_and_recompute(tp2_run, data_dir, tmp_path):
    src = tmp_path / "from_tp2"
    shutil.copytree(tp2_run / "checkpoints" / f"step_{SAVE_AT:06d}", src)
    torchrun(4, _args(data_dir, tmp_path / "run", "parallel.tp=4", "parallel.sequence_parallel=true",
                      "parallel.recompute=full", f"checkpoint.resume={src}"))
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(SAVE_AT + 1, STEPS + 1))
    assert_runs_match(recs, read_metrics(tp2_run)[SAVE_AT:])


def test_tp_not_dividing_ffn_dim_fails_before_any_work(tmp_path):
    data = tmp_path / "data"  # must not be created: the error comes before data preparation
    proc = torchrun(2, [*MODEL, "model.ffn_dim=73", f"data.dir={data}", f"run_dir={tmp_path / 'run'}",
                        "parallel.tp=2"], check=False)
    assert proc.returncode != 0
    assert "parallel.tp=2 does not divide model.ffn_dim=73" in proc.stdout + proc.stderr
    assert not data.exists()


def test_world_not_divisible_by_tp_fails_in_process(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by parallel.tp=2 × parallel.pp=1"):
        train_in_process(_args(data_dir, tmp_path, "parallel.tp=2"))
