"""Checkpoint conversion: Tandem <-> Hugging Face Llama, consolidate, re-shard, inspect, verify.

    python scripts/convert_checkpoint.py to-hf runs/tiny/checkpoints/step_000200 hf/tiny --dtype bf16
    python scripts/convert_checkpoint.py from-hf hf/tiny ckpt/tiny
    python scripts/convert_checkpoint.py consolidate SRC DST
    python scripts/convert_checkpoint.py reshard SRC DST --tp 2 --pp 2
    python scripts/convert_checkpoint.py inspect SRC
    python scripts/convert_checkpoint.py verify SRC

Only argument parsing here; the work is in engine/convert/.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import convert  # noqa: E402
from engine.checkpoint import CheckpointError  # noqa: E402
from engine.config import ConfigError, writable_destination  # noqa: E402
from engine.layout import check_end_only_empty  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name, help, dst=True):
        c = sub.add_parser(name, help=help)
        c.add_argument("src", help="source checkpoint directory")
        if dst:
            c.add_argument("dst", help="destination directory (written as DST.tmp, renamed when complete)")
            c.add_argument("--force", action="store_true", help="replace DST if it exists")
        return c

    c = cmd("to-hf", "Tandem checkpoint -> Hugging Face Llama directory")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight dtype (default: the checkpoint's)")
    c.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    c.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json, or a directory holding one "
                                          "(default: the one the checkpoint records)")
    c.add_argument("--no-tokenizer", action="store_true", help="write the weights and configs only")
    c = cmd("from-hf", "Hugging Face Llama directory -> Tandem checkpoint")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="stored dtype (default fp32)")
    c.add_argument("--max-file-size", default="5GB", help="largest output file (default 5GB)")
    c = cmd("consolidate", "full tensors in one file set")
    c.add_argument("--max-file-size", default=None, help="split into files of at most this size (default: one file)")
    c = cmd("reshard", "one file per rank of a target (tp, pp) layout")
    c.add_argument("--tp", type=int, required=True)
    c.add_argument("--pp", type=int, required=True)
    c.add_argument("--virtual-stages", type=int, default=1, help="model chunks per pp rank (interleaved 1F1B)")
    c.add_argument("--layers-per-stage", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated layer counts per chunk (default: balanced)")
    c = cmd("inspect", "model config, step, layout, tensors", dst=False)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmd("verify", "checksums, full coverage, no overlaps", dst=False)
    return p


def check_args(a) -> None:
    """Every argument, before any work: the same kind of checks (and messages) as the config keys."""
    for flag in ("max_shard_size", "max_file_size"):
        text = getattr(a, flag, None)
        if text is not None and convert.parse_size(text) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {text} must be a positive size such as 5GB (0 would "
                              f"not mean unlimited); omit it for the default")
    for flag in ("tp", "pp", "virtual_stages"):
        v = getattr(a, flag, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {v} must be at least 1")
    if getattr(a, "layers_per_stage", None) is not None:
        try:  # 0 only on the first (embedding only) and last (head only) chunk, as for the trainer
            check_end_only_empty(a.layers_per_stage, "--layers-per-stage")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if getattr(a, "dst", None) is not None:
        writable_destination(a.dst, "dst")


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        check_args(a)
        if a.command == "to-hf":
            out = convert.to_hf(a.src, a.dst, dtype=a.dtype, max_shard_size=a.max_shard_size, tokenizer=a.tokenizer,
                                with_tokenizer=not a.no_tokenizer, force=a.force)
        elif a.command == "from-hf":
            out = convert.from_hf(a.src, a.dst, dtype=a.dtype, max_file_size=a.max_file_size, force=a.force)
        elif a.command == "consolidate":
            out = convert.consolidate(a.src, a.dst, max_file_bytes=convert.parse_size(a.max_file_size), force=a.force)
        elif a.command == "reshard":
            out = convert.reshard(a.src, a.dst, tp=a.tp, pp=a.pp, virtual_stages=a.virtual_stages,
                                  layers_per_stage=a.layers_per_stage, force=a.force)
        elif a.command == "inspect":
            info = convert.inspect(a.src)
            print(json.dumps(info, indent=1) if a.json else convert.format_inspect(info))
            return 0
        else:
            for line in convert.verify(a.src):
                print("ok:", line)
            return 0
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
