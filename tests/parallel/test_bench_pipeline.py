"""scripts/bench_pipeline.py on a toy model: 1F1B, ZB-V and DualPipeV in both engines run in one world
and compute the same loss, so the benchmark compares like with like, and what the table is made of
is there and plausible."""
from scripts.bench_pipeline import _summarize, first_losses, parse_args, _worker
from tests.support.distributed import run_distributed


def test_bench_pipeline_compares_like_with_like():
    args = parse_args(["--quick", "--steps", "1", "--layers", "4"])
    schedules = ["1f1b", "zbv", "dualpipev"]   # one of each placement, the F&B pairs included (a spawn costs ~10 s)
    # torch's pipelining is the peer being measured, not code under the NCCL contract
    results = run_distributed(_worker, world_size=2, args=(schedules, args, "time"), nccl_contract=False)
    losses = first_losses(results)
    assert {s for s, _ in losses} == set(schedules)              # torch ran every schedule
    assert all((s, "tandem") in losses for s in schedules)        # and Tandem every schedule, the V ones too
    ref = losses[("1f1b", "torch")]
    for key, loss in losses.items():
        assert abs(loss - ref) < 1e-4 * abs(ref), (key, loss, ref)
    tokens = args.micro * args.mb * args.seq
    for s in schedules:
        res = _summarize([r[s] for r in results], [r[s] for r in results], args, tokens)
        for engine, e in res.items():
            assert e["tps"] > 0 and 0 < e["ideal"] <= 1.0, (s, engine, e)   # compute happens inside a step
            assert len(e["peak"]) == 2
