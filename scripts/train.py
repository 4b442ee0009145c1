"""Pretraining launch: `python scripts/train.py [overrides]` or `torchrun ... scripts/train.py [overrides]`."""
import sys

import hydra
import torch.distributed as dist

from engine.config import register_configs, to_config
from engine.trainer import main as train_main

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    try:
        train_main(to_config(cfg))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
