"""The stage planner: exact search, the shape of its answers, its errors, and the plan file."""
import itertools
import subprocess
import sys

import pytest

from engine import planner as P
from models.config import ModelConfig
from tests.support.launch import ROOT, compose

H100 = P.get_device("h100")
LLAMA8B = ModelConfig.from_name("llama3_8b")


def test_uniform_model_gets_an_even_split():
    # vocab 64 against dim 1024: the embedding and head cost next to nothing
    m = ModelConfig(dim=1024, n_layers=16, n_heads=8, n_kv_heads=8, ffn_dim=4096, vocab_size=64, max_seq_len=2048)
    for sched in ("1f1b", "zb_h1"):
        pl = P.plan(P.Setup(m, pp=4, seq_len=2048, global_batch=8), H100, schedules=(sched,))
        assert pl.layers_per_stage == [4, 4, 4, 4]
    pl = P.plan(P.Setup(m, pp=4, seq_len=2048, global_batch=8), H100, schedules=("interleaved_1f1b",))
    assert pl.virtual_stages == 2 and pl.layers_per_stage == [2] * 8


def test_large_vocabulary_shrinks_first_and_last_stages():
    pl = P.plan(P.Setup(LLAMA8B, tp=8, pp=4, seq_len=4096, global_batch=16), H100, schedules=("1f1b",))
    lps = pl.layers_per_stage
    assert sum(lps) == 32 and lps[0] < min(lps[1:-1]) and lps[-1] < min(lps[1:-1]), lps
    assert pl.even_step_time_s > pl.step_time_s  # the even split is measurably worse under the model


def test_memory_knobs_move_the_cost_model_the_right_way():
    base = dict(tp=4, pp=4, dp=8, seq_len=4096, global_batch=64)
    cost = lambda **kw: P.CostModel(P.Setup(LLAMA8B, **{**base, **kw}), H100, 1)  # noqa: E731
    plain, full, sel, sp = cost(), cost(recompute="full"), cost(recompute="selective"), cost(sequence_parallel=True)
    assert full.layer().act_bytes < sel.layer().act_bytes < plain.layer().act_bytes
    assert full.layer().bwd_s > sel.layer().bwd_s > plain.layer().bwd_s  # recomputation is paid in backward
    assert sp.layer().act_bytes < plain.layer().act_bytes
    # each tp rank sends 1/tp of a hidden state either way; without SP it is all-gathered on arrival
    assert sp.p2p_bytes() == plain.p2p_bytes() and sp.p2p_time() < plain.p2p_time()
    assert cost(zero=1).state_bytes_per_param() == 4 + 4 + 8 / 8 < plain.state_bytes_per_param() == 16
    assert cost(tp=8).layer().params < plain.layer().params
    assert cost(dp=1).dp_sync_time(10**9) == 0 < plain.dp_sync_time(10**9)


def test_tied_embeddings_last_stage_keeps_its_copy():
    m = ModelConfig.from_name("llama3_1b")
    pl = P.plan(P.Setup(m, tp=2, pp=4, seq_len=2048, global_batch=8), H100, schedules=("1f1b",))
    first, last = pl.stages[0], pl.stages[-1]
    table = m.vocab_size * m.dim // 2
    assert first.params > table and last.params > table  # both hold the (tp-sharded) embedding table
    assert pl.layers_per_stage[-1] < max(pl.layers_per_stage)


def test_dp_matches_brute_force_on_odd_costs():
    """Exactness: on irregular item costs and memory, the DP finds the true smallest bottleneck."""
    items = [P.Item("embedding", 0.3, 0.0, 0.2, 50, 1.0)]
    items += [P.Item(f"l{i}", f, f, f / 2, 10 + i, a) for i, (f, a) in enumerate(
        [(1.0, 3), (2.5, 1), (0.7, 2), (1.9, 5), (1.1, 1), (3.0, 2), (0.4, 4)])]
    items += [P.Item("head", 2.0, 1.5, 1.0, 60, 6.0)]
    in_flight, bpp = [3, 2, 1], 1.0
    for limit in (1e9, 100.0, 75.0):
        best = None
        for cuts in itertools.product(range(1, 6), repeat=3):
            if sum(cuts) != 7:
                continue
            starts = [0, cuts[0], cuts[0] + cuts[1]]
            held = [P.stage_items(items, (starts[k], starts[k] + cuts[k]), 3, k, False) for k in range(3)]
            if any(P.stage_memory(h, in_flight[k], bpp) > limit for k, h in enumerate(held)):
                continue
            bottleneck = max(P.stage_time(h) for h in held)
            best = bottleneck if best is None else min(best, bottleneck)
        cuts = P.best_partition(items, 3, in_flight=in_flight, bytes_per_param=bpp, mem_limit=limit)
        if best is None:
            assert cuts is None
            continue
        starts = [0, cuts[0], cuts[0] + cuts[1]]
        got = max(P.stage_time(P.stage_items(items, (starts[k], starts[k] + cuts[k]), 3, k, False))
                  for k in range(3))
        assert got == pytest.approx(best), (limit, cuts)


@pytest.mark.parametrize("pp,n_layers,vocab", [(2, 3, 32000), (3, 10, 128256), (4, 13, 4096)])
def test_search_never_worse_than_even_split(pp, n_layers, vocab):
    m = ModelConfig(dim=2048, n_layers=n_layers, n_heads=16, n_kv_heads=4, ffn_dim=5632, vocab_size=vocab,
                    max_seq_len=2048)
    setup = P.Setup(m, tp=2, pp=pp, seq_len=2048, global_batch=8)
    for sched in ("1f1b", "zb_h1"):
        pl = P.plan(setup, H100, schedules=(sched,), micro_batch_sizes=[1])
        assert pl.even_step_time_s is not None and pl.step_time_s <= pl.even_step_time_s * (1 + 1e-12)


def test_evaluate_partition_reproduces_the_plan():
    setup = P.Setup(LLAMA8B, tp=8, pp=4, seq_len=2048, global_batch=8)
    pl = P.plan(setup, H100, schedules=("1f1b",), micro_batch_sizes=[2])
    step, bubble, reports = P.evaluate_partition(setup, H100, pl.layers_per_stage, schedule="1f1b", micro_batch=2)
    assert step == pytest.approx(pl.step_time_s) and bubble == pytest.approx(pl.bubble)
    assert [r.layer_ranges for r in reports] == [r.layer_ranges for r in pl.stages]
    with pytest.raises(ValueError, match=r"layers_per_stage=\[8, 8, 8\] must give each of the 4 stages"):
        P.evaluate_partition(setup, H100, [8, 8, 8], schedule="1f1b", micro_batch=2)


def test_tighter_memory_changes_the_choice_or_names_the_smallest_budget():
    setup = P.Setup(LLAMA8B, tp=8, pp=4, seq_len=8192, global_batch=8)
    roomy = P.plan(setup, H100)
    assert roomy.schedule == "interleaved_1f1b"  # fastest, but holds the most activations on rank 0
    roomy_peak = max(s.peak_mem for s in roomy.stages) / P.GB + H100.reserve_gb
    budget = roomy_peak - 1.0
    tight = P.plan(setup, H100, mem_budget_gb=budget)
    assert tight.schedule != roomy.schedule and tight.step_time_s >= roomy.step_time_s
    assert max(s.peak_mem for s in tight.stages) <= (budget - H100.reserve_gb) * P.GB
    with pytest.raises(P.Infeasible, match=r"smallest memory per device that works is [\d.]+ GB") as e:
        P.plan(setup, H100, mem_budget_gb=8.0)
    need = float(str(e.value).split("works is ")[1].split(" GB")[0])
    assert need > 8.0
    fits = P.plan(setup, H100, mem_budget_gb=need + 0.01)  # the named budget really is enough
    assert max(s.peak_mem for s in fits.stages) <= (need + 0.01 - H100.reserve_gb) * P.GB


def test_bad_input_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"parallel.pp=5 is greater than model.n_layers=4.*lower parallel.pp"):
        P.Setup(ModelConfig(), pp=5)
    with pytest.raises(ValueError, match=r"unknown planner.device='tpu9'; known devices: a100, cpu, h100, h100_pcie, h200"):
        P.get_device("tpu9")
    with pytest.raises(ValueError, match=r"must look like <dir>/plan/<name>.yaml"):
        P.out_path_usage("plans/x.yaml")
    with pytest.raises(ValueError, match=r"micro_batch_sizes \[3\] do not divide the per-dp batch 16"):
        P.plan(P.Setup(ModelConfig(), pp=2, global_batch=16), H100, micro_batch_sizes=[3])
    with pytest.raises(ValueError, match="use it with parallel.tp=1"):
        P.profile_items(P.Setup(ModelConfig(), tp=2), 1)


def test_in_flight_activations_follow_the_schedule():
    from engine.pipeline.generators import build_schedule

    p, m = 4, 8
    assert [sum(d.values()) for d in P.in_flight_counts(build_schedule("1f1b", p, m))] == [4, 3, 2, 1]
    assert [sum(d.values()) for d in P.in_flight_counts(build_schedule("gpipe", p, m))] == [m] * p
    inter = P.in_flight_counts(build_schedule("interleaved_1f1b", p, m, virtual_stages=2))
    assert set(inter[0]) == {0, 4} and sum(inter[0].values()) > p  # two chunks, more in flight than 1F1B


def test_profile_mode_times_the_real_layers():
    m = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=512, max_seq_len=32)
    setup = P.Setup(m, pp=2, seq_len=32, global_batch=4)
    items = P.profile_items(setup, 2, reps=2)
    assert len(items) == 5 and all(i.fwd_s > 0 and i.bwd_s > 0 for i in items)
    # the analytic activation estimate is close to what autograd really keeps for one layer
    analytic = P.CostModel(setup, P.get_device("cpu"), 2).layer().act_bytes
    assert 0.7 < analytic / items[1].act_bytes <= 1.0
    full = P.profile_items(P.Setup(m, pp=2, seq_len=32, global_batch=4, recompute="full"), 2, reps=2)
    assert full[1].act_bytes < items[1].act_bytes
    pl = P.plan(setup, P.get_device("cpu"), micro_batch_sizes=[2], schedules=("1f1b",),
                items_for=lambda mb: items)
    assert sum(pl.layers_per_stage) == 3 and pl.step_time_s > 0


def test_plan_file_loads_into_the_training_config(tmp_path):
    setup = P.Setup(ModelConfig(n_layers=5), pp=2, seq_len=64, global_batch=8)
    pl = P.plan(setup, P.get_device("cpu"))
    cmd = P.write_plan(pl, setup, str(tmp_path / "plan" / "mine.yaml"), "tiny")
    assert f"--config-dir {tmp_path} +plan=mine" in cmd
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "+plan=mine", "model.n_layers=5"])
    assert cfg.parallel.layers_per_stage == pl.layers_per_stage and sum(cfg.parallel.layers_per_stage) == 5
    assert cfg.parallel.dp == 1 and cfg.parallel.tp == 1
    assert (cfg.parallel.pp, cfg.parallel.schedule, cfg.parallel.virtual_stages, cfg.parallel.micro_batch_size) == \
        (2, pl.schedule, pl.virtual_stages, pl.micro_batch_size)
    assert cfg.train.global_batch_size == 8 and cfg.plan["predicted_step_time_s"] > 0
    assert cfg.precision == "fp32"                   # costed at the CPU profile's fp32 activations
    gpu = P.plan(setup, P.get_device("h100"))
    assert "\nprecision: bf16\n" in P.plan_yaml(gpu, setup, "tiny")   # a GPU plan runs what it was costed at


def test_script_prints_a_plan_and_fails_cleanly(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "scripts/plan_stages.py", f"hydra.run.dir={tmp_path}", *a],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)})
    ok = run("model=llama3_8b", "parallel.tp=8", "parallel.pp=4", "planner.device=h100",
             "planner.micro_batch_sizes=[1,2]", f"planner.out={tmp_path}/plan/p.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "layers_per_stage [" in ok.stdout and "MFU" in ok.stdout and (tmp_path / "plan" / "p.yaml").exists()
    bad = run("planner.device=tpu9")
    assert bad.returncode == 2 and "unknown planner.device='tpu9'" in bad.stderr


def test_infeasible_from_config_names_the_knob_that_fits():
    cfg = compose(["model=llama3_8b", "parallel.tp=8", "parallel.pp=4", "train.seq_len=8192",
                   "train.global_batch_size=16", "planner.micro_batch_sizes=[1,2]", "planner.mem_budget_gb=12"])
    with pytest.raises(P.Infeasible, match=r"smallest memory per device that works is [\d.]+ GB.*"
                                           r"these fit: .*parallel.recompute=full \([\d.]+ ms/step\)"):
        P.plan_from_config(cfg)
