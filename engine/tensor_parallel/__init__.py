"""Megatron-style tensor parallelism (see `engine.tensor_parallel.layers`)."""
from engine.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, SeqShard, VocabParallelCrossEntropy,
                                           VocabParallelEmbedding, enter_tp, exit_tp, kv_rows, linear_weight_grad,
                                           padded_vocab, parallelize, save_matmul_input, sync_tp_grads,
                                           unpack_matmul_input, validate_tp, vocab_shard)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "SeqShard", "VocabParallelCrossEntropy", "VocabParallelEmbedding",
           "enter_tp", "exit_tp", "kv_rows", "linear_weight_grad", "padded_vocab", "parallelize", "save_matmul_input",
           "sync_tp_grads", "unpack_matmul_input", "validate_tp", "vocab_shard"]
