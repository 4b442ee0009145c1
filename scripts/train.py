"""Pretraining launch: `python scripts/train.py [overrides]` or `torchrun ... scripts/train.py [overrides]`.

Configuration, data and checkpoint errors print `error: ...` and exit 2 (engine/cli.py)."""
import sys

import hydra
import torch.distributed as dist

from engine.cli import run_cli
from engine.config import register_configs, to_config
from engine.trainer import main as train_main

register_configs()


def train(cfg) -> None:
    try:
        train_main(to_config(cfg))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    sys.exit(run_cli(train, cfg))


if __name__ == "__main__":
    main()
