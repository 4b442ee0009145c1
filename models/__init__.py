"""Single-device model definitions: the serial reference every parallel layout is checked against."""
from models.config import PRESETS, ModelConfig
from models.init import init_weights
from models.llama import Llama
from models.shard import ShardMeta, iter_params, set_shard_meta, shard_meta

__all__ = ["PRESETS", "ModelConfig", "Llama", "ShardMeta", "init_weights", "iter_params",
           "set_shard_meta", "shard_meta"]
