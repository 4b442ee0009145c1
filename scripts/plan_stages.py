"""Stage planner: `python scripts/plan_stages.py model=llama3_8b parallel.tp=8 parallel.pp=4 planner.device=h100`.

Same conf/ as scripts/train.py, so model/parallel/train keys mean the same; planner.* keys are listed
in engine/config.py (PlannerSchema). With planner.evaluate=true there is no search: the layout in parallel.*,
optim.zero, precision and train.* is predicted as it stands (step time, tokens/s, TFLOP/s per GPU, MFU, and
each rank's memory with a fits / does-not-fit verdict). Prints the per-stage table; with planner.out=<dir>/plan/<name>.yaml
writes a Hydra override file that `scripts/train.py +plan=<name>` (plus `--config-dir <dir>` outside conf/)
accepts. Every setting is checked first (engine.config.validate); errors print `error: ...`, exit 2.
"""
import sys

import hydra

from engine.cli import run_cli
from engine.config import ConfigError, register_configs, to_config, validate, writable_destination
from engine.planner import (Infeasible, evaluate_from_config, format_evaluation, format_plan, plan_from_config,
                            write_plan)

register_configs()


def plan_stages(cfg) -> None:
    cfg = to_config(cfg)
    validate(cfg, purpose="plan")
    if cfg.planner.evaluate:
        if cfg.planner.out:
            raise ConfigError("planner.evaluate=true predicts the configured layout and writes no plan; "
                              "drop planner.out")
        try:
            pl, setup, limit = evaluate_from_config(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        print(format_evaluation(pl, setup, limit))
        return
    if cfg.planner.out:
        writable_destination(cfg.planner.out, "planner.out")
    try:
        pl, setup = plan_from_config(cfg)
    except (Infeasible, ValueError) as e:
        raise ConfigError(str(e)) from None
    print(format_plan(pl, setup))
    if cfg.planner.out:
        cmd = write_plan(pl, setup, cfg.planner.out, cfg.model.name)
        print(f"wrote {cfg.planner.out}; train with:\n  {cmd}")
    else:
        print("(add planner.out=conf/plan/<name>.yaml to write it for `scripts/train.py +plan=<name>`)")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    sys.exit(run_cli(plan_stages, cfg))


if __name__ == "__main__":
    main()
