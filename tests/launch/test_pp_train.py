"""The training launch with pipeline parallelism: per-step losses equal the serial run's, a
checkpoint written at pp=2 resumes at pp=1 and pp=4, and bad pipeline configs fail before work."""
import shutil

import pytest

from tests.support.distributed import run_distributed
from tests.support.launch import SMALL_MODEL, assert_runs_match, read_metrics, torchrun, train_in_process

STEPS = 10
# global batch 8 / micro-batch 2 = 4 micro-batches per step
SMALL_PP = [o for o in SMALL_MODEL if not o.startswith("model.n_layers")] + ["model.n_layers=4",
                                                                            "model.tie_embeddings=true"]


@pytest.fixture(scope="module")
def serial(serial_run):
    return serial_run(SMALL_PP, STEPS)


SCHEDULE_RUNS = {
    "gpipe": ["parallel.schedule=gpipe", "parallel.layers_per_stage=[3,1]"],
    "1f1b": ["parallel.schedule=1f1b"],
    "1f1b+recompute": ["parallel.schedule=1f1b", "parallel.recompute=full"],
    "zb_h1": ["parallel.schedule=zb_h1"],
    "zb_h1+recompute": ["parallel.schedule=zb_h1", "parallel.recompute=full"],
    "interleaved_1f1b": ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
}


def _train_each(rank, world, runs):
    """The real trainer (engine.trainer.main on a composed config) once per schedule, in one world."""
    from engine.trainer import main
    from tests.support.launch import compose

    return {name: main(compose(overrides)) for name, overrides in runs.items()}


def test_pp2_training_matches_serial_for_every_schedule(data_dir, tmp_path, serial):
    runs = {name: [*SMALL_PP, f"data.dir={data_dir}", f"run_dir={tmp_path / name}", f"train.max_steps={STEPS}",
                   "parallel.pp=2", *extra] for name, extra in SCHEDULE_RUNS.items()}
    results = run_distributed(_train_each, world_size=2, args=(runs,))
    for name in SCHEDULE_RUNS:
        for rank_records in results:   # every rank returns the global loss and norm; rank 0 logs them
            assert_runs_match(rank_records[name], serial)
        assert_runs_match(read_metrics(tmp_path / name), serial)


def test_pp2_dp2_zero_bubble_matches_serial(data_dir, tmp_path, serial):
    """pp × dp: zb_h1's deferred weight gradients reach the data-parallel average (ZeRO-1 on), with
    full recompute (the recomputed forward feeds both the input and the deferred weight gradients).
    This launch also stands for test_3d's former pp2×dp2 zero=1 recompute=full layout."""
    torchrun(4, [*SMALL_PP, f"data.dir={data_dir}", f"run_dir={tmp_path}", f"train.max_steps={STEPS}",
                 "parallel.pp=2", "parallel.dp=2", "parallel.schedule=zb_h1", "optim.zero=1",
                 "parallel.recompute=full"])
    assert_runs_match(read_metrics(tmp_path), serial)


def test_checkpoint_from_pp2_resumes_at_pp1_and_pp4(data_dir, tmp_path, serial):
    """Stop a pp=2 run at step 5 (it saves), then finish the remaining steps at pp=1 and at pp=4:
    both continue the serial loss curve."""
    common = [*SMALL_PP, f"data.dir={data_dir}", f"train.max_steps={STEPS}"]
    first = tmp_path / "pp2"
    torchrun(2, [*common, f"run_dir={first}", "parallel.pp=2", "train.stop_at=5"])
    assert_runs_match(read_metrics(first), serial[:5])
    for pp, run in ((1, tmp_path / "pp1"), (4, tmp_path / "pp4")):
        shutil.copytree(first / "checkpoints", run / "checkpoints")
        args = [*common, f"run_dir={run}", "checkpoint.resume=auto"]
        if pp == 1:
            records = train_in_process(args)
        else:
            torchrun(pp, [*args, f"parallel.pp={pp}", "parallel.schedule=1f1b"])
            records = read_metrics(run)
        assert_runs_match(records, serial[5:])


def test_bad_pipeline_config_fails_before_work(data_dir, tmp_path):
    proc = torchrun(2, [*SMALL_PP, f"data.dir={tmp_path / 'never_prepared'}", f"run_dir={tmp_path}",
                        "parallel.pp=2", "parallel.schedule=pipedream"], check=False)
    assert proc.returncode != 0
    assert "unknown pipeline schedule 'pipedream'; known schedules: gpipe, 1f1b" in proc.stdout + proc.stderr
    assert not (tmp_path / "never_prepared").exists() and not (tmp_path / "metrics.jsonl").exists()
