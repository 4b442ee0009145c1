"""Megatron-style tensor parallelism, one concern per module:

- `plan`: the one table of how each parameter is laid out over tp and where activations enter the
  tp region (read by `parallelize`, the gradient sync, the checkpoint converter and the planner's
  `validate_tp`), with the KV-head and vocabulary-padding rules;
- `mappings`: the autograd mappings ``f`` / ``g`` (`enter_tp`, `exit_tp`);
- `seq_shard`: the sequence-sharded layout and saving a matmul's shard instead of its gather;
- `layers`: the parallel layers and `parallelize`;
- `grad_sync`: `sync_tp_grads`.
"""
from engine.tensor_parallel.grad_sync import sync_tp_grads
from engine.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelCrossEntropy,
                                           VocabParallelEmbedding, parallelize)
from engine.tensor_parallel.mappings import enter_tp, exit_tp
from engine.tensor_parallel.plan import (ENTRIES, PLAN, Entry, GradSync, Style, TPLayout, TPShard, kv_rows,
                                         padded_vocab, param_shard, validate_tp, vocab_shard)
from engine.tensor_parallel.seq_shard import (SeqShard, linear_weight_grad, save_matmul_input,
                                              unpack_matmul_input)

__all__ = ["ENTRIES", "PLAN", "ColumnParallelLinear", "Entry", "GradSync", "RowParallelLinear", "SeqShard", "Style",
           "TPLayout", "TPShard", "VocabParallelCrossEntropy", "VocabParallelEmbedding", "enter_tp", "exit_tp",
           "kv_rows", "linear_weight_grad", "padded_vocab", "param_shard", "parallelize", "save_matmul_input",
           "sync_tp_grads", "unpack_matmul_input", "validate_tp", "vocab_shard"]
