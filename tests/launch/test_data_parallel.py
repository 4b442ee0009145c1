"""Data parallelism, ZeRO-1, recompute, coordinated shutdown and a two-"node" launch, against serial."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.support.distributed import run_distributed
from tests.support.launch import (ROOT, SMALL_MODEL, assert_runs_match, free_port, grad_norms, losses, read_metrics,
                                  start_torchrun, torchrun)
from tests.support.trainer_world import run_trainers

STEPS = 10


@pytest.fixture(scope="module")
def serial(serial_run):
    return serial_run(SMALL_MODEL, STEPS)


DP2_RUNS = {
    "zero0_full": ["optim.zero=0", "parallel.recompute=full"],
    "zero1_selective": ["optim.zero=1", "parallel.recompute=selective"],
    "zero1_none": ["optim.zero=1", "parallel.recompute=none"],
}


@pytest.fixture(scope="module")
def dp2_world(data_dir, tmp_path_factory):
    """The three dp2 layouts in one 2-process gloo world (the real trainer, in turn): one process
    start instead of three torchrun launches. The launches below keep torchrun's own path covered."""
    root = tmp_path_factory.mktemp("dp2_world")
    runs = {name: [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={root / name}", f"train.max_steps={STEPS}",
                   "parallel.dp=2", f"checkpoint.interval={STEPS}", *extra] for name, extra in DP2_RUNS.items()}
    return root, run_distributed(run_trainers, world_size=2, args=(runs,))


@pytest.mark.parametrize("name", sorted(DP2_RUNS))
def test_dp2_matches_serial(dp2_world, serial, name):
    root, results = dp2_world
    run = root / name
    for rank_out in results:
        assert_runs_match(rank_out[name], serial)
    assert_runs_match(read_metrics(run), serial)
    # ZeRO-1 shards optimizer state: rank 1 then holds (and writes) state no other rank has
    manifest = json.loads((run / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").read_text())
    writers = {s["file"] for k, t in manifest["tensors"].items() if k.startswith("optim/") for s in t["slices"]}
    assert writers == ({"rank_00000.safetensors", "rank_00001.safetensors"} if "optim.zero=1" in DP2_RUNS[name]
                       else {"rank_00000.safetensors"})


def test_sigterm_on_one_rank_saves_and_exits_zero_then_resume_is_exact(data_dir, tmp_path):
    run = tmp_path / "run"
    base = [*SMALL_MODEL, f"data.dir={data_dir}", "train.max_steps=100000", "parallel.dp=2"]
    proc, workers = start_torchrun(2, run, base, after_steps=3)
    os.kill(workers[-1], signal.SIGTERM)  # one rank only; the other must agree and stop too
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = read_metrics(run)[-1]["step"]
    assert (run / "checkpoints" / f"step_{stopped_at:06d}" / "manifest.json").is_file()
    assert "stop requested" in out

    torchrun(2, [*base, f"run_dir={run}", "checkpoint.resume=auto", f"train.stop_at={stopped_at + 3}"])
    ref = tmp_path / "ref"
    torchrun(2, [*base, f"run_dir={ref}", f"train.stop_at={stopped_at + 3}"])
    assert losses(read_metrics(run)) == losses(read_metrics(ref))  # bit-identical continuation
    assert grad_norms(read_metrics(run)) == grad_norms(read_metrics(ref))


def test_two_nodes_on_localhost(data_dir, tmp_path, serial):
    """Two torchrun "nodes" (one process each) joined by a static rendezvous on 127.0.0.1, one pipeline
    stage per node: the layout a cluster uses (tp inside a node, pp across nodes); it trains as serial."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "scripts/train.py",
         *SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={tmp_path}", f"train.max_steps={STEPS}", "parallel.pp=2"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert_runs_match(recs, serial)
    assert "rank 0/2" in outs[0]  # the mesh banner: node 0 holds global rank 0 of a world of 2
