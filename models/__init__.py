"""Single-device model definitions: the serial reference every parallel layout is checked against."""
from models.config import PRESETS, ModelConfig
from models.init import ShardMeta, init_weights, iter_params, set_shard_meta, shard_meta
from models.llama import Llama

__all__ = ["PRESETS", "ModelConfig", "Llama", "ShardMeta", "init_weights", "iter_params",
           "set_shard_meta", "shard_meta"]
