"""The real trainer run several times in one gloo world (for `run_distributed`).

Kept apart from the test modules because a spawned rank imports the module of the function it
runs: here that costs torch and the engine only, not what a test module pulls in (transformers).
"""


def run_trainers(rank, world, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """``engine.trainer.main`` on each composed override list, in order; returns each run's records."""
    from engine.trainer import main
    from tests.launch import compose

    return {name: main(compose(overrides)) for name, overrides in runs.items()}
