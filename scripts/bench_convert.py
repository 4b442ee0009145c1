"""Peak memory of checkpoint conversion: is it bounded by one tensor, not the model?

    PYTHONPATH=. python scripts/bench_convert.py [--dim 1024 --n-layers 12 --vocab 16384] [--shard 128MB]

Builds (streaming, with random values) a checkpoint saved as tp=2 ranks would save it, several
times larger than its largest tensor, then runs each conversion in a fresh subprocess and reads
that process's resident set before the conversion (after its imports) and its peak during it (the
kernel's high-water mark, reset after the imports through /proc/self/clear_refs). The converter
promises peak - before <= largest tensor + one output shard; it holds less, since the writer streams
and no shard is ever held whole. Linux only (reads /proc).
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.checkpoint import model_key  # noqa: E402
from engine.convert import parse_size  # noqa: E402
from engine.convert.names import param_shapes  # noqa: E402
from engine.convert.tandem import tp_region  # noqa: E402
from engine.convert.writer import Region, write_tandem  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from scripts.convert_checkpoint import main as convert_main  # noqa: E402

MiB = 2**20


def make_checkpoint(path: Path, cfg: ModelConfig) -> tuple[int, int]:
    """A tp=2-sharded checkpoint of ``cfg`` with random weights; returns (total bytes, largest tensor bytes)."""
    files: dict[str, list[Region]] = {}
    shapes = param_shapes(cfg)
    for name, shape in shapes.items():
        for t in range(2):
            box = tp_region(name, shape, cfg, 2, t)
            if box is None and t:
                continue
            off, sub = box or ((0,) * len(shape), shape)
            files.setdefault(f"rank_{t:05d}.safetensors", []).append(
                Region(model_key(name), shape, off, sub, torch.float32))
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    write_tandem(path, files, lambda r: torch.randn(r.shape, generator=gen) * 0.02, model_config=cfg.to_dict(),
                 layout={"tp": 2, "pp": 1, "dp": 1}, train_state={"step": 0}, step=0)
    sizes = [torch.Size(s).numel() * 4 for s in shapes.values()]
    return sum(sizes), max(sizes)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(argv: list[str]) -> None:
    """Run one conversion and print the resident set before it and the peak during it."""
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    rc = convert_main(argv)
    assert rc == 0, f"conversion {argv} failed"
    print(json.dumps({"before": before, "peak": _status("VmHWM"),
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_rss(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--shard", default="128MB", help="--max-shard-size / --max-file-size of the outputs")
    p.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    a = p.parse_args()
    cfg = ModelConfig(dim=a.dim, n_layers=a.n_layers, n_heads=16, n_kv_heads=4, ffn_dim=int(a.dim * 2.75),
                      vocab_size=a.vocab, max_seq_len=2048)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    shard = parse_size(a.shard)
    try:
        src = work / "tandem"
        total, largest = make_checkpoint(src, cfg)
        runs = [("to-hf", ["to-hf", str(src), str(work / "hf"), "--no-tokenizer", "--max-shard-size", a.shard]),
                ("to-hf bf16", ["to-hf", str(src), str(work / "hf16"), "--no-tokenizer", "--dtype", "bf16",
                                "--max-shard-size", a.shard]),
                ("from-hf", ["from-hf", str(work / "hf"), str(work / "back"), "--max-file-size", a.shard]),
                ("consolidate", ["consolidate", str(src), str(work / "one")]),
                ("reshard tp2 pp2", ["reshard", str(work / "one"), str(work / "re"), "--tp", "2", "--pp", "2"])]
        bound = largest + shard
        print(f"model: {cfg.num_params() / 1e6:.1f}M params, {total / MiB:.0f} MiB fp32 = {total / largest:.1f}x "
              f"its largest tensor ({largest / MiB:.0f} MiB); output shard limit {shard / MiB:.0f} MiB; "
              f"bound = largest tensor + one shard = {bound / MiB:.0f} MiB")
        print(f"{'conversion':<16} {'RSS before':>11} {'peak RSS':>10} {'peak - before':>14} {'bound':>9} "
              f"{'model size':>11} {'within bound':>13}")
        for name, argv in runs:
            r = peak_rss(argv)
            extra = r["peak"] - r["before"]
            print(f"{name:<16} {r['before'] / MiB:>7.0f} MiB {r['peak'] / MiB:>6.0f} MiB {extra / MiB:>10.0f} MiB "
                  f"{bound / MiB:>5.0f} MiB {total / MiB:>7.0f} MiB {'yes' if extra <= bound else 'NO':>13}")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
