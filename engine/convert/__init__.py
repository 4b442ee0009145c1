"""Checkpoint conversion (issue #8): Tandem <-> Hugging Face Llama, consolidate, re-shard,
inspect, verify. Streaming throughout: one tensor in memory at a time, never a whole file or model.
``scripts/convert_checkpoint.py`` is the command line; everything it does lives here."""
from engine.convert.hf import from_hf, parse_size, to_hf
from engine.convert.tandem import consolidate, format_inspect, inspect, reshard, verify

__all__ = ["to_hf", "from_hf", "consolidate", "reshard", "inspect", "format_inspect", "verify", "parse_size"]
