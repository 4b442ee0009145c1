"""The stage planner: exact search, the shape of its answers, its errors, and the plan file."""
import importlib.util
import itertools
import re
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
        for cuts in itertools.product(range(0, 6), repeat=3):
            if sum(cuts) != 7 or cuts[1] == 0:   # the end stages may be empty, the middle one not
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


def test_a_heavy_head_gets_a_stage_of_its_own():
    """The end stages may hold no layers: a head costing three layers takes the last stage alone."""
    items = [P.Item("embedding", 0.1, 0.0, 0.0, 1, 0.0)] + [P.Item(f"l{i}", 0.5, 0.25, 0.25, 1, 0.0) for i in range(6)]
    items += [P.Item("head", 1.5, 0.75, 0.75, 1, 0.0)]
    assert P.best_partition(items, 3, in_flight=[1, 1, 1], bytes_per_param=1.0, mem_limit=1e9, empty_ends=True) == [3, 3, 0]
    assert P.best_partition(items, 3, in_flight=[1, 1, 1], bytes_per_param=1.0, mem_limit=1e9, tied=True, empty_ends=True) == [3, 3, 0]
    assert P.best_partition(items[:3] + items[-1:], 4, in_flight=[1] * 4, bytes_per_param=1.0, mem_limit=1e9,
                            empty_ends=True) == [0, 1, 1, 0]   # 2 layers over 4 stages: only with both ends empty
    # plan() too: 2 layers in pp=2 × v=2 chunks is feasible now, with no even split to compare against
    m = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=512, vocab_size=64, max_seq_len=128)
    setup = P.Setup(m, pp=2, seq_len=128, global_batch=8)
    pl = P.plan(setup, H100, schedules=("interleaved_1f1b",), micro_batch_sizes=[1])
    assert pl.virtual_stages == 2 and pl.layers_per_stage == [0, 1, 1, 0] and pl.even_step_time_s is None
    table = P.format_plan(pl, setup)
    assert "none,1-1 (1)" in table and "0-0,none (1)" in table, table


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
    with pytest.raises(ValueError, match=r"layers_per_stage=\[8, 0, 16, 8\] gives stage 1 no layers"):
        P.evaluate_partition(setup, H100, [8, 0, 16, 8], schedule="1f1b", micro_batch=2)
    # empty end stages are layouts like any other: the embedding alone first, the head alone last
    step, _, reports = P.evaluate_partition(setup, H100, [0, 16, 16, 0], schedule="1f1b", micro_batch=2)
    assert [r.layer_ranges for r in reports] == [[(0, 0)], [(0, 16)], [(16, 32)], [(32, 32)]] and step > 0


def test_tighter_memory_changes_the_choice_or_names_the_smallest_budget():
    setup = P.Setup(LLAMA8B, tp=8, pp=4, seq_len=8192, global_batch=8)
    roomy = P.plan(setup, H100)
    # fastest under the simulator: ZB-V (8 micro-batches = 2p, its ramps filled), which holds 2p
    # half-stage chunks on every rank; the search places its stages in the V (rank 0: both ends)
    assert roomy.schedule == "zbv" and roomy.virtual_stages == 2
    assert roomy.stages[0].layer_ranges[0][0] == 0 and roomy.stages[0].layer_ranges[1][1] == LLAMA8B.n_layers
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
    with pytest.raises(ValueError,
                       match=r"unknown planner.device='tpu9'; known devices: a100, cpu, h100, h100_pcie, h200"):
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


# -- issue 16: the cost model at scale -----------------------------------------------------------------
def _cfg(*extra):
    return compose(["model=llama3_1b", "parallel.tp=2", "parallel.pp=4", "train.seq_len=2048",
                    "train.global_batch_size=16", "planner.device=h100", "planner.schedules=[1f1b,zb_h1]",
                    "planner.micro_batch_sizes=[1,2]", *extra])


def test_evaluate_mode_reproduces_the_searched_plan():
    pl, _ = P.plan_from_config(_cfg())
    lps = ",".join(map(str, pl.layers_per_stage))
    cfg = _cfg("planner.evaluate=true", "precision=bf16", f"parallel.layers_per_stage=[{lps}]",
               f"parallel.schedule={pl.schedule}", f"parallel.virtual_stages={pl.virtual_stages}",
               f"parallel.micro_batch_size={pl.micro_batch_size}")
    ev, setup, limit = P.evaluate_from_config(cfg)
    assert ev.step_time_s == pytest.approx(pl.step_time_s, rel=1e-12) and ev.mfu == pytest.approx(pl.mfu)
    assert [r.peak_mem for r in ev.stages] == pytest.approx([r.peak_mem for r in pl.stages])
    text = P.format_evaluation(ev, setup, limit)
    assert re.search(r"MFU \d+\.\d%", text) and "TFLOP/s per GPU" in text and "memory: fits" in text
    tight = P.format_evaluation(ev, setup, min(r.peak_mem for r in ev.stages) / 2)
    assert "memory: DOES NOT FIT: the largest rank" in tight
    with pytest.raises(ValueError, match="set precision=bf16"):
        P.evaluate_from_config(_cfg("planner.evaluate=true"))


@pytest.mark.parametrize("device", ["a100", "h100", "h100_pcie"])
def test_gemm_efficiency_rises_with_size_and_stays_under_its_ceiling(device):
    dev = P.get_device(device)
    sizes = [64, 256, 1024, 4096, 16384]
    for m, k, n in itertools.product(sizes, repeat=3):
        e = dev.gemm_efficiency(m, k, n)
        assert 0 < e < dev.matmul_eff
        for bigger in ((2 * m, k, n), (m, 2 * k, n), (m, k, 2 * n)):
            assert dev.gemm_efficiency(*bigger) > e
    assert dev.gemm_efficiency(16384, 16384, 16384) > 0.95 * dev.matmul_eff


def test_dp_reduction_overlaps_backward_and_stays_in_the_node_when_it_can():
    base = dict(pp=1, seq_len=2048, global_batch=64)
    cm = lambda **kw: P.CostModel(P.Setup(LLAMA8B, **{**base, **kw}), H100, 1)  # noqa: E731
    params = 10**9
    intra, inter = cm(tp=1, dp=8), cm(tp=2, dp=8)  # 8 GPUs: one node; 16 GPUs: two, over the NICs
    per_param = lambda c: c.dp_sync_time(params)  # noqa: E731
    assert per_param(intra) == pytest.approx(2 * 7 / 8 * params * 4 / H100.tp_bw)
    # across nodes: each node's 4 dp members drive a ring over their own NIC
    assert per_param(inter) == pytest.approx(2 * 7 / 8 * params * 4 / (4 * H100.pp_bw))
    assert per_param(inter) > 2 * per_param(intra)
    assert cm(tp=1, dp=8, gpus_per_node=4).dp_sync_time(params) == pytest.approx(per_param(inter))
    # overlap: with a long backward only the last 25 MiB bucket trails; without one all of it shows
    total = inter.dp_sync_time(params)
    assert inter.dp_exposed_time(params, 0.0) == pytest.approx(total)
    assert inter.dp_exposed_time(params, 10 * total) == pytest.approx(total * 25 * 2**20 / (params * 4))
    assert inter.dp_exposed_time(params, total / 2) == pytest.approx(total / 2)
    # ZeRO-2 with bf16 parameters reduces bf16 gradients: half the bytes
    assert cm(tp=2, dp=8, zero=2, precision="bf16").dp_sync_time(params) == pytest.approx(total / 2)
    # and the predicted step is lower than with the reduction charged in full after backward
    setup = P.Setup(LLAMA8B, tp=2, pp=2, dp=8, seq_len=2048, global_batch=64)
    step, _, reports = P.evaluate_partition(setup, H100, [16, 16], schedule="1f1b", micro_batch=1)
    c = P.CostModel(setup, H100, 1)
    hidden = max(c.dp_sync_time(r.params) - c.dp_exposed_time(r.params, r.bwd_s) for r in reports)
    assert hidden > 0.01 * step


def test_p2p_is_scattered_over_the_tp_ranks_links():
    one, eight = (P.CostModel(P.Setup(LLAMA8B, tp=tp, pp=4, seq_len=4096, global_batch=8), H100, 1)
                  for tp in (1, 8))
    assert eight.p2p_bytes() * 8 == one.p2p_bytes()
    nic = lambda c: c.p2p_bytes() / H100.pp_bw  # noqa: E731
    gather = eight.p2p_time() - H100.p2p_latency_s - nic(eight)
    assert nic(one) / nic(eight) == 8 and gather == pytest.approx(7 / 8 * one.p2p_bytes() / H100.tp_bw)
    assert one.p2p_time() - H100.p2p_latency_s == pytest.approx(nic(one))


def test_optimizer_memory_of_every_zero_mode_in_bytes():
    m = ModelConfig.from_name("llama3_1b")
    def bpp(**kw):
        return P.CostModel(P.Setup(m, seq_len=2048, global_batch=64, **kw), H100, 1).state_bytes_per_param()

    # fp32 parameters + fp32 gradients + two fp32 moments (autocast leaves the parameters fp32)
    assert bpp(dp=4, zero=0) == 16 and bpp(dp=4, zero=0, precision="bf16") == 16
    assert bpp(dp=4, zero=1) == 4 + 4 + 8 / 4 and bpp(dp=4, zero=2, precision="fp32") == 4 + 4 + 8 / 4
    # ZeRO-2 with bf16: bf16 parameters and gradients, and per dp rank a quarter of the fp32 gradient
    # copy, the fp32 master and the two moments
    assert bpp(dp=4, zero=2, precision="bf16") == 2 + 2 + (4 + 4 + 8) / 4
    assert bpp(dp=1, zero=2, precision="bf16") == 16  # dp = 1 runs as zero=0
    # a whole rank: parameters × bytes + in-flight activations + one recomputed layer's working set
    setup = P.Setup(m, pp=2, dp=4, zero=2, precision="bf16", seq_len=2048, global_batch=64, recompute="full")
    step, _, reports = P.evaluate_partition(setup, H100, [8, 8], schedule="1f1b", micro_batch=1)
    items = P.CostModel(setup, H100, 1).items()
    emb, layer = items[0], items[1]
    assert reports[0].params == emb.params + 8 * layer.params
    assert reports[0].peak_mem == pytest.approx(reports[0].params * 8 + 2 * 8 * layer.act_bytes + layer.work_bytes)
    assert layer.act_bytes == 2048 * m.dim * 2  # full recompute keeps the bf16 layer input only


def test_embedding_only_and_head_only_chunks_are_planned():
    # a 256k vocabulary on a narrow model: the head alone outweighs several layers
    m = ModelConfig(dim=1024, n_layers=6, n_heads=8, n_kv_heads=8, ffn_dim=2816, vocab_size=262144,
                    max_seq_len=2048)
    setup = P.Setup(m, tp=1, pp=4, seq_len=2048, global_batch=8)
    pl = P.plan(setup, H100, schedules=("1f1b",), micro_batch_sizes=[1])
    assert pl.layers_per_stage[-1] == 0 and sum(pl.layers_per_stage) == 6, pl.layers_per_stage
    assert pl.stages[-1].params == m.vocab_size * m.dim + m.dim  # the head (and final norm) alone
    assert pl.step_time_s < P.plan(setup, H100, schedules=("1f1b",), micro_batch_sizes=[1],
                                   empty_ends=False).step_time_s
    # an expensive embedding gets a stage of its own; brute force over 0-layer ends agrees
    items = [P.Item("embedding", 8.0, 0.0, 1.0, 10, 0.0)] + [P.Item(f"l{i}", 1.0, 1.0, 0.5, 5, 1.0)
                                                           for i in range(6)] + [P.Item("head", 1.0, 1.0, 0.5, 10, 1.0)]
    cuts = P.best_partition(items, 3, in_flight=[1, 1, 1], bytes_per_param=1.0, mem_limit=1e9, empty_ends=True)
    assert cuts[0] == 0
    best = min(max(P.stage_time(P.stage_items(items, (sum(c[:k]), sum(c[:k + 1])), 3, k, False)) for k in range(3))
               for c in itertools.product(range(7), repeat=3) if sum(c) == 6 and c[1] >= 1)
    got = max(P.stage_time(P.stage_items(items, (sum(cuts[:k]), sum(cuts[:k + 1])), 3, k, False)) for k in range(3))
    assert got == pytest.approx(best)
    step, _, reports = P.evaluate_partition(setup, H100, [0, 3, 3, 0], schedule="1f1b", micro_batch=1)
    assert reports[0].layer_ranges == [(0, 0)] and reports[0].params == m.vocab_size * m.dim
    with pytest.raises(ValueError, match="gives stage 1 no layers; only the first stage"):
        P.evaluate_partition(setup, H100, [2, 0, 2, 2], schedule="1f1b", micro_batch=1)


def test_long_pipelines_are_extrapolated_exactly_and_stages_placed_by_the_schedule():
    m = ModelConfig(dim=1024, n_layers=13, n_heads=8, n_kv_heads=8, ffn_dim=2816, vocab_size=65536,
                    max_seq_len=1024)
    for sched, v, lps in (("1f1b", 1, [2, 4, 4, 3]), ("zb_h1", 1, [3, 3, 4, 3]),
                          ("interleaved_1f1b", 2, [1, 2, 2, 2, 2, 1, 2, 1])):
        setup = P.Setup(m, pp=4, seq_len=1024, global_batch=40)
        cand = P._candidate(setup, sched, v, 1)
        cm = P.CostModel(setup, H100, 1)
        items = cm.items()
        times = {}
        for k in range(4 * v):
            held = P.stage_items(items, (sum(lps[:k]), sum(lps[:k + 1])), 4 * v, k, False)
            times[k] = {"F": sum(i.fwd_s for i in held), "B": sum(i.bwd_s for i in held),
                        "I": sum(i.bwd_input_s for i in held), "W": sum(i.bwd_weight_s for i in held)}
        cost = lambda r, a: times[a.stage].get(a.kind, 0.0)  # noqa: E731
        fast = P.simulate_step(setup, cand, cost, cm.p2p_time())
        full = P.simulate_step(setup, cand, cost, cm.p2p_time(), extrapolate=False)
        assert fast[0] == pytest.approx(full[0], rel=1e-9) and fast[2] == pytest.approx(full[2], rel=1e-9)
        assert P.stage_ranks(cand.actions, 4 * v) == [k % 4 for k in range(4 * v)]
    # a V placement (stages r and 2p-1-r on rank r) is read off the actions as it is
    from engine.pipeline.actions import Action, Kind
    v_lists = [[Action(r, Kind.F, 0), Action(7 - r, Kind.F, 0)] for r in range(4)]
    assert P.stage_ranks(v_lists, 8) == [0, 1, 2, 3, 3, 2, 1, 0]


def test_validate_planner_reproduces_sc21_within_ten_percent():
    spec = importlib.util.spec_from_file_location("validate_planner", ROOT / "scripts" / "validate_planner.py")
    vp = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = vp  # its dataclasses look their module up
    spec.loader.exec_module(vp)
    rows = vp.validate("a100")
    assert len(rows) == 10
    for r in rows:
        assert 0.9 <= r.ratio <= 1.1 and r.fits, (r.name, r.ratio, r.peak_gb)
    # the published trend: large pipelined models reach more TFLOP/s per GPU than the 1.7B one
    assert rows[-1].predicted > rows[0].predicted


def test_optimizer_bytes_match_the_launch_memory_report():
    """The planner's bytes per parameter against `engine.memory.persistent_bytes` (the launch report,
    itself held to the real tensors by tests/parallel/test_zero2.py) on every dp rank of dp=4."""
    import torch

    from engine.memory import persistent_bytes
    from engine.mesh import Mesh
    from engine.optim import param_refs
    from models.llama import Llama

    m = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128, vocab_size=256, max_seq_len=32)
    model = Llama(m)
    n = sum(p.numel() for p in model.parameters())
    for zero, precision in ((0, "fp32"), (1, "fp32"), (2, "fp32"), (2, "bf16")):
        if precision == "bf16":
            model = model.to(torch.bfloat16)  # what the trainer does for zero=2 + bf16 at dp > 1
        refs = param_refs([model])
        setup = P.Setup(m, dp=4, zero=zero, precision=precision, seq_len=32, global_batch=4)
        planned = n * P.CostModel(setup, P.get_device("cpu"), 1).state_bytes_per_param()
        for r in range(4):
            mesh = Mesh(1, 4, 1, 0, r, 0, r, 4, torch.device("cpu"), None, None, None, None)
            got = persistent_bytes(refs, [model], mesh, zero=zero)
            # step counters and bucket padding are all that differ
            assert got["total"] - got["buffers"] == pytest.approx(planned, rel=1e-3), (zero, precision, r)
