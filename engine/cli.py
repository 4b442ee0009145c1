"""How the entry points report failures: a user's error (a setting, the data, a checkpoint, a busy
run directory) is one line `error: ...` and exit code 2; a run that cannot go on (a failed save,
a diverged loss) is `error: ...` and exit code 1; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import os
import sys

from engine.checkpoint import CheckpointError, SaveFailed
from engine.config import ConfigError
from engine.data import DataError
from engine.run_dir import RunDirLocked
from engine.trainer import TrainingDiverged

USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirLocked)
RUN_ERRORS = (SaveFailed, TrainingDiverged)  # the run cannot go on; the settings were fine


def report(e: BaseException) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""
    print(f"error: {where}{e}", file=sys.stderr, flush=True)


def run_cli(fn, *args) -> int:
    """``fn(*args)``; returns the exit code (0, 1 or 2) after printing any error as one line."""
    try:
        fn(*args)
    except USER_ERRORS as e:
        report(e)
        return 2
    except RUN_ERRORS as e:
        report(e)
        return 1
    return 0
