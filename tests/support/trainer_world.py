"""The real trainer run several times in one gloo world (for `run_distributed`).

Kept apart from the test modules because a spawned rank imports the module of the function it
runs: here that costs torch and the engine only, not what a test module pulls in (transformers).
"""


def run_trainers(rank, world, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """``engine.trainer.main`` on each composed override list, in order; returns each run's records."""
    from engine.trainer import main
    from tests.support.launch import compose

    return {name: main(compose(overrides)) for name, overrides in runs.items()}


def run_trainers_reporting_dtypes(rank, world, runs: dict[str, list[str]]) -> dict[str, dict]:
    """As `run_trainers`, plus the dtypes each run ends with: parameters, optimizer state, and the
    loss it logged (a Python float means it was reduced in float64 from a float32 loss)."""
    import torch
    import torch.distributed as dist

    from engine.trainer import Trainer
    from tests.support.launch import compose

    out = {}
    for name, overrides in runs.items():
        trainer = Trainer(compose(overrides))
        records = trainer.run()
        state = [v for st in trainer.optimizer.inner.state.values() for k, v in st.items() if k.startswith("exp")]
        out[name] = {"records": records,
                     "param_dtypes": sorted({str(r.param.dtype) for r in trainer.refs}),
                     "state_dtypes": sorted({str(v.dtype) for v in state}),
                     "autocast": str(trainer.autocast.fast_dtype) if isinstance(trainer.autocast, torch.autocast)
                     else None}
        dist.barrier()
    return out


def run_trainers_recording_p2p_dtypes(rank, world, runs: dict[str, list[str]]) -> dict[str, dict]:
    """As `run_trainers`, plus the dtypes of every tensor each run sent or received point-to-point."""
    import engine.pipeline.runtime as runtime
    from engine.trainer import main
    from tests.support.launch import compose

    out, seen = {}, set()
    real = runtime.post_p2p
    runtime.post_p2p = lambda ops: seen.update(str(op.tensor.dtype) for op in ops) or real(ops)
    try:
        for name, overrides in runs.items():
            seen.clear()
            out[name] = {"records": main(compose(overrides)), "p2p_dtypes": sorted(seen)}
    finally:
        runtime.post_p2p = real
    return out


def run_trainers_reporting_errors(rank, world, runs: dict[str, list[str]]) -> dict[str, str]:
    """As `run_trainers`, but each run's exception is caught: returns ``"<type>: <message>"`` per run
    (``"ok"`` when it ran through), so a test can assert that every rank failed the same way."""
    from engine.trainer import main
    from tests.support.launch import compose

    out = {}
    for name, overrides in runs.items():
        try:
            main(compose(overrides))
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[name] = f"{type(e).__name__}: {e}"
    return out


def refuse_then_train(rank, world, refused: dict[str, list[str]], runs: dict[str, list[str]]) -> dict:
    """Each of ``refused`` through the entry point's error path (`engine.cli.run_cli` around the real
    trainer on a composed config, as scripts/train.py runs it under torchrun): its exit code and what
    it printed to stderr; then `run_trainers` on ``runs`` in the same world. A config refused before any
    work leaves the process group usable, so one world serves both (each torchrun launch costs ~9 s)."""
    import contextlib
    import io

    from engine.cli import run_cli
    from engine.trainer import main
    from tests.support.launch import compose

    out = {}
    for name, overrides in refused.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run_cli(lambda o=overrides: main(compose(o)))
        out[name] = {"code": code, "stderr": err.getvalue()}
    return {"refused": out, "runs": run_trainers(rank, world, runs)}


def run_compiled_trainers(rank, world, runs: dict[str, list[str]]) -> dict[str, dict]:
    """As `run_trainers` for ``train.compile=true`` runs, plus what Dynamo counted during each: graph
    breaks (must be 0: blocks compile with fullgraph), graphs compiled, and whether each block of each
    chunk really is compiled."""
    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from engine.trainer import Trainer
    from tests.support.launch import compose

    out = {}
    for name, overrides in runs.items():
        torch._dynamo.reset()
        counters.clear()
        trainer = Trainer(compose(overrides))
        try:
            records = trainer.run()
        finally:
            trainer.close()
        dist.barrier()
        out[name] = {"records": records, "graph_breaks": sum(counters["graph_break"].values()),
                     "graphs": counters["stats"]["unique_graphs"],
                     "blocks_compiled": [b._compiled_call_impl is not None for c in trainer.chunks
                                         for b in c.layers.values()]}
    return out
