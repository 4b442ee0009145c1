"""The serial reference of the multi-rank tests: one unsharded model, one forward and backward.

Every layout is held against this: the same config, the same seed (`init_weights` draws each
parameter's global tensor, so a shard holds exactly its slice of it), the same whole batch.
"""
from __future__ import annotations

import torch

from models import Llama, ModelConfig, init_weights


def serial_step(cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> tuple[Llama, torch.Tensor]:
    """(model with its gradients, detached loss) of the unsharded model on the batch ``x -> y``."""
    with torch.device("meta"):
        model = Llama(cfg)
    init_weights(model, seed=seed, n_layers=cfg.n_layers, device="cpu")
    loss = model(x, y)
    loss.backward()
    return model, loss.detach()
