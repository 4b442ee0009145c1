"""Data preparation benchmark: Tandem's streaming preparation against a Hugging Face `datasets` `.map`.

    python scripts/bench_data.py [--gb 1.0] [--workers 1 2] [--formats jsonl parquet] [--out DIR]

Builds a corpus of at least ``--gb`` GB (the standard-library sources repeated) as JSONL and as Parquet,
trains one SentencePiece tokenizer (vocab 4096, the default run's), exports its identical
``tokenizer.json``, then measures, each in a fresh process: Tandem's ``prepare_data`` with each worker
count (SentencePiece .model), and ``datasets.load_dataset(...).map(tokenizer, batched=True)`` with the
tokenizer.json through ``AutoTokenizer`` (skipped with a note when `datasets` is absent). Peak memory is
the largest sum of proportional set sizes (PSS) over the process and its children, sampled every 0.1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's engine, whichever copy is installed
VOCAB = 4096
# Every library is imported inside the function that uses it: each measured child process (this
# script with --child) then holds only its own side's libraries, so the memory compared is theirs.


def build_corpus(out: Path, gb: float) -> tuple[Path, Path]:
    """The stdlib's .py files as documents, repeated into (up to) 8 JSONL and 8 Parquet files of ≥ gb in all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jdir, pdir = out / "jsonl", out / "parquet"
    if (out / "corpus.done").is_file():
        return jdir, pdir
    jdir.mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(errors="replace") for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts]
    one = sum(len(d.encode()) for d in docs)
    reps = max(1, int(gb * 1e9 / one + 0.999))
    n_files = min(8, reps)  # no empty files: their Parquet schema would have no string column
    for k in range(n_files):
        copies = range(k, reps, n_files)
        texts = [f"# copy {c}\n{d}" for c in copies for d in docs]  # a different first line per copy
        with open(jdir / f"part{k}.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        pq.write_table(pa.table({"text": texts}), pdir / f"part{k}.parquet", row_group_size=2000)
    (out / "corpus.done").write_text("")
    return jdir, pdir


def make_tokenizer(out: Path) -> tuple[Path, Path]:
    from engine.data.tokenizer import reservoir_lines, sentencepiece_to_hf, train_sentencepiece

    model, hf_dir = out / "tok" / "tokenizer.model", out / "tok_hf"
    if not model.is_file():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = (p.read_text(errors="replace") for p in sorted(stdlib.rglob("*.py")))
        tok = train_sentencepiece(reservoir_lines(texts, 400_000), VOCAB)
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(tok.blob)
        hf_dir.mkdir(exist_ok=True)
        sentencepiece_to_hf(tok.blob).save(str(hf_dir / "tokenizer.json"))
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "split_special_tokens": True}))
    return model, hf_dir


# -- one measured run, in a child process --------------------------------------------------------------
def run_tandem(corpus: str, out: str, tokenizer: str, workers: int) -> dict:
    from engine.data import prepare_data

    t0 = time.perf_counter()
    meta = prepare_data(corpus, out, VOCAB, tokenizer=tokenizer, workers=workers, progress=False)
    return {"seconds": time.perf_counter() - t0, "tokens": meta["train_tokens"] + meta["val_tokens"]}


def run_datasets(corpus: str, fmt: str, hf_dir: str, cache: str) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    t0 = time.perf_counter()
    files = sorted(str(p) for p in Path(corpus).iterdir())
    ds = load_dataset("json" if fmt == "jsonl" else "parquet", data_files=files, split="train", cache_dir=cache)
    t_load = time.perf_counter() - t0

    def encode(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [tok.eos_token_id] for x in ids], "n": [len(x) + 1 for x in ids]}

    ds = ds.map(encode, batched=True, remove_columns=["text"])
    tokens = sum(ds["n"])
    return {"seconds": time.perf_counter() - t0, "load_seconds": t_load, "tokens": tokens}


# -- measuring a child ----------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    kids, out = {}, [pid]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    for q in out:
        out += kids.get(q, [])
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(args: list[str], env: dict) -> dict:
    """Run ``bench_data.py --child ...`` and return its result with the peak PSS of its process tree."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_kb(p) for p in _descendants(proc.pid)))
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"benchmark child {args} failed with exit status {proc.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": peak[0] / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--formats", nargs="+", default=["jsonl", "parquet"], choices=["jsonl", "parquet"])
    p.add_argument("--no-baseline", action="store_true", help="skip the datasets column")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "tandem_bench_data"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, *rest = a.child
        res = run_tandem(rest[0], rest[1], rest[2], int(rest[3])) if kind == "tandem" else run_datasets(*rest)
        print(json.dumps(res))
        return
    out = Path(a.out)
    jdir, pdir = build_corpus(out, a.gb)
    model, hf_dir = make_tokenizer(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        import datasets  # noqa: F401
        have_datasets = not a.no_baseline
    except ImportError:
        have_datasets = False
    rows = []
    for fmt, corpus in (("jsonl", jdir), ("parquet", pdir)):
        if fmt not in a.formats:
            continue
        size = sum(f.stat().st_size for f in corpus.iterdir()) / 1e9
        for w in a.workers:
            dst = out / f"prepared_{fmt}_{w}"
            subprocess.run(["rm", "-rf", str(dst)], check=True)
            r = measure(["tandem", str(corpus), str(dst), str(model), str(w)], env)
            rows.append((fmt, size, f"Tandem prepare_data, {w} worker{'s' * (w > 1)}", r))
            print(_row(*rows[-1]), flush=True)
            subprocess.run(["rm", "-rf", str(dst)], check=True)
        if have_datasets:
            cache = out / f"hf_cache_{fmt}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            r = measure(["datasets", str(corpus), fmt, str(hf_dir), str(cache)], env)
            rows.append((fmt, size, "datasets load_dataset + .map (AutoTokenizer)", r))
            print(_row(*rows[-1]), flush=True)
            subprocess.run(["rm", "-rf", str(cache)], check=True)
    print("\n| format | corpus GB | how | tokens | seconds | tokens/s | peak memory (PSS, MB) |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(*row))
    if not have_datasets:
        why = "--no-baseline" if a.no_baseline else "`datasets` is not installed; `pip install datasets`"
        print(f"\n(the `datasets` baseline was skipped: {why})")


def _row(fmt, size, how, r) -> str:
    extra = f" (load {r['load_seconds']:.0f} s)" if "load_seconds" in r else ""
    return (f"| {fmt} | {size:.2f} | {how} | {r['tokens']:,} | {r['seconds']:.0f}{extra} | "
            f"{r['tokens'] / r['seconds']:,.0f} | {r['peak_mb']:,.0f} |")


if __name__ == "__main__":
    main()
