"""Stage planner: `python scripts/plan_stages.py model=llama3_8b parallel.tp=8 parallel.pp=4 planner.device=h100`.

Same conf/ as scripts/train.py, so model/parallel/train keys mean the same; planner.* keys are listed
in engine/config.py (PlannerSchema). Prints the per-stage table; with planner.out=<dir>/plan/<name>.yaml
writes a Hydra override file that `scripts/train.py +plan=<name>` (plus `--config-dir <dir>` outside conf/)
accepts.
"""
import sys

import hydra

from engine.config import register_configs, to_config
from engine.planner import Infeasible, format_plan, plan_from_config, write_plan

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    cfg = to_config(cfg)
    try:
        pl, setup = plan_from_config(cfg)
    except (Infeasible, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_plan(pl, setup))
    if cfg.planner.out:
        cmd = write_plan(pl, setup, cfg.planner.out, cfg.model.name)
        print(f"wrote {cfg.planner.out}; train with:\n  {cmd}")
    else:
        print("(add planner.out=conf/plan/<name>.yaml to write it for `scripts/train.py +plan=<name>`)")


if __name__ == "__main__":
    sys.exit(main())
