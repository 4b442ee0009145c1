"""3D parallelism in one launch (TP × PP × DP) against the serial run, and resharding resume."""
import shutil

import pytest

from tests.support.distributed import run_distributed
from tests.support.launch import (SMALL_MODEL, assert_losses_match, assert_runs_match, losses, read_metrics, torchrun,
                                  train_in_process)
from tests.support.trainer_world import run_trainers_reporting_dtypes

STEPS = 10
# tied embeddings: the first and last pipeline stages each hold a (vocab-sharded) copy whose gradients combine
MODEL = [*SMALL_MODEL, "model.tie_embeddings=true"]


@pytest.fixture(scope="module")
def serial(serial_run):
    return serial_run(MODEL, STEPS)


@pytest.fixture(scope="module")
def tp2pp2_run(data_dir, tmp_path_factory):
    """The uninterrupted tp2×pp2 run, saving at step 5 for the resharding tests."""
    run = tmp_path_factory.mktemp("tp2pp2")
    torchrun(4, [*MODEL, f"data.dir={data_dir}", f"run_dir={run}", f"train.max_steps={STEPS}",
                 "parallel.tp=2", "parallel.pp=2", "optim.zero=0", "parallel.recompute=none",
                 "checkpoint.interval=5", "checkpoint.keep_last=2"])
    return run


def test_tp2_pp2_matches_serial(tp2pp2_run, serial):
    assert_runs_match(read_metrics(tp2pp2_run), serial)


# pp2×dp2 with ZeRO-1 and full recompute is test_pp_train's zero-bubble launch (4 layers, tied, zb_h1);
# pp2×dp2 ZeRO-1 on this odd 3-layer model is the resharding resume below
FP32_LAYOUTS = {
    "tp2_dp2_zero1_selective": ["parallel.tp=2", "parallel.dp=2", "optim.zero=1", "parallel.recompute=selective"],
    "tp2_pp2_sp_zb_h1_full": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                              "parallel.schedule=zb_h1", "optim.zero=0", "parallel.recompute=full"],
}


@pytest.fixture(scope="module")
def world4(data_dir, tmp_path_factory, tp2pp2_run):
    """One 4-process gloo world for the 3D layouts, fp32 (against serial) and bf16 (tracking it), and
    the pp2×dp2 ZeRO-1 resume of the tp2×pp2 run's step-5 checkpoint: the real trainer, in turn;
    the tp2×pp2 launch itself keeps torchrun's own path covered."""
    root = tmp_path_factory.mktemp("world4")
    runs = {name: [*MODEL, f"data.dir={data_dir}", f"run_dir={root / name}", f"train.max_steps={STEPS}", *layout]
            for name, layout in FP32_LAYOUTS.items()}
    ckpt = root / "from_tp2pp2"
    shutil.copytree(tp2pp2_run / "checkpoints" / "step_000005", ckpt)
    runs["resume_pp2dp2"] = [*MODEL, f"data.dir={data_dir}", f"run_dir={root / 'resume_pp2dp2'}",
                             f"train.max_steps={STEPS}", f"checkpoint.resume={ckpt}", "parallel.pp=2",
                             "parallel.dp=2", "optim.zero=1"]
    runs.update({f"bf16_{name}": [*MODEL, f"data.dir={data_dir}", f"run_dir={root / ('bf16_' + name)}",
                                  f"train.max_steps={STEPS}", "precision=bf16", *layout]
                 for name, layout in BF16_LAYOUTS.items()})
    return root, run_distributed(run_trainers_reporting_dtypes, world_size=4, args=(runs,))[0]


@pytest.mark.parametrize("name", sorted(FP32_LAYOUTS))
def test_3d_layouts_match_serial(world4, serial, name):
    root, result = world4
    assert_runs_match(result[name]["records"], serial)
    assert_runs_match(read_metrics(root / name), serial)


@pytest.mark.parametrize("target", ["pp2dp2", "serial"])
def test_resharding_resume_from_tp2_pp2(data_dir, tmp_path, tp2pp2_run, world4, target):
    """Save at step 5 under tp2×pp2; resume under another layout (pp2×dp2 ZeRO-1 in the 4-rank world,
    or serial here); steps 6–10 match the uninterrupted run."""
    if target == "serial":
        ckpt = tmp_path / "from_tp2pp2"
        shutil.copytree(tp2pp2_run / "checkpoints" / "step_000005", ckpt)
        resumed = train_in_process([*MODEL, f"data.dir={data_dir}", f"run_dir={tmp_path}",
                                    f"train.max_steps={STEPS}", f"checkpoint.resume={ckpt}"])
    else:
        root, result = world4
        resumed = result["resume_pp2dp2"]["records"]
        assert_runs_match(read_metrics(root / "resume_pp2dp2"), read_metrics(tp2pp2_run)[5:])
    assert_runs_match(resumed, read_metrics(tp2pp2_run)[5:])


# bf16 autocast against the fp32 serial run. Measured (2-core CPU, torch 2.13): the largest relative
# difference per step over the 10 steps is 1.2e-4 to 1.3e-4 for the four layouts (step 1, before any
# update, 6e-6 to 9e-6), against ~1e-7 for fp32 layouts; 1e-3 leaves about 7x room over that.
BF16_REL = 1e-3
BF16_LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2_1f1b": ["parallel.pp=2", "parallel.schedule=1f1b"],
                "pp2_zb_h1": ["parallel.pp=2", "parallel.schedule=zb_h1"],
                "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"]}


def test_bf16_layouts_track_the_fp32_serial_run(world4, serial):
    """precision=bf16 on the CPU runs under CPU autocast (it used to run fp32 silently): tp2, pp2 with
    1f1b and zb_h1, and tp2×pp2 (the first three with dp2 in this 4-rank world) follow the fp32 serial
    losses within BF16_REL, really differ from them (so bf16 ran), and keep float32 parameters and
    optimizer state."""
    _, everything = world4
    result = {name[len("bf16_"):]: res for name, res in everything.items() if name.startswith("bf16_")}
    assert sorted(result) == sorted(BF16_LAYOUTS)
    reference = losses(serial)
    for name, res in result.items():
        assert res["autocast"] == "torch.bfloat16", name
        assert res["param_dtypes"] == ["torch.float32"] and res["state_dtypes"] == ["torch.float32"], (name, res)
        got = losses(res["records"])
        assert_losses_match(got, reference, rel=BF16_REL)
        assert max(abs(a - b) / b for a, b in zip(got, reference)) > 1e-5, (name, got)   # not fp32 in disguise
