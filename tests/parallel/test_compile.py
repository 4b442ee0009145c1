"""train.compile=true on the parallel layouts against the eager serial run, over 10 steps: tp2 (with
sequence parallelism and full recompute), pp2 (zero-bubble zb_h1, selective recompute) and tp2×pp2
(sequence parallelism, zero-bubble). Each block compiles whole (fullgraph: a graph break would fail
the launch; the count is asserted too). These use the aot_eager backend: Dynamo and AOTAutograd
trace exactly what inductor is given (functional collectives, the deferred-matmul and kernel custom
ops, recompute), without inductor's C++ compile, which on this 2-core CPU takes ~35 s per graph
and process; the serial run (tests/unit/test_compile.py) runs inductor."""
import pytest

from tests.support.distributed import run_distributed
from tests.support.launch import SMALL_MODEL, assert_runs_match
from tests.support.trainer_world import run_compiled_trainers

STEPS = 10
MODEL = SMALL_MODEL   # kernels=auto: torch on a CPU; the reference is shared with tests/launch/test_data_parallel.py
COMPILE = ["train.compile=true", "train.compile_backend=aot_eager", f"train.max_steps={STEPS}"]
LAYOUTS = {
    2: {"tp2-sp-full": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.recompute=full"],
        "pp2-zb_h1-selective": ["parallel.pp=2", "parallel.schedule=zb_h1", "parallel.recompute=selective"]},
    4: {"tp2xpp2-sp-zb_h1": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                             "parallel.schedule=zb_h1"]},
}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_compiled_layouts_match_eager_serial(world, data_dir, tmp_path, serial_run):
    eager = serial_run(MODEL, STEPS)
    runs = {name: [*MODEL, *layout, *COMPILE, f"data.dir={data_dir}", f"run_dir={tmp_path / name}"]
            for name, layout in LAYOUTS[world].items()}
    for rank, by_run in enumerate(run_distributed(run_compiled_trainers, world, (runs,))):
        for name, out in by_run.items():
            assert out["graph_breaks"] == 0, (name, rank)
            assert out["blocks_compiled"] and all(out["blocks_compiled"]), (name, rank)
            assert out["graphs"] >= 1, (name, rank)
            assert_runs_match(out["records"], eager)
