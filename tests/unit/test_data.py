"""Data preparation and sampling (issue 17), on small generated corpora.

Formats, existing tokenizers, byte-identical output for any number of workers, bounded memory, no
repeated sequence within an epoch, blending proportions and exact resume, and every bad input as a
clear error that leaves nothing half-written.
"""
import gzip
import hashlib
import json
import shutil
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.data import DataError, DataMix, TokenData, load_tokenizer, open_sources, permute, prepare_data
from engine.data.prepare import is_val_doc, prepare_once
from tests.conftest import TEST_VOCAB
from tests.support.launch import SMALL_MODEL, grad_norms, losses, read_metrics, train_in_process


@pytest.fixture(scope="module")
def docs(corpus_dir) -> list[str]:
    """About 300 documents: the small corpus cut at blank lines into pieces of ~1.5 kB, plus a few
    with non-ASCII text."""
    out = []
    for f in sorted(corpus_dir.iterdir()):
        piece = ""
        for para in f.read_text().split("\n\n"):
            piece += para + "\n\n"
            if len(piece) > 1500:
                out.append(piece)
                piece = ""
    return out + ["naïve café — 日本語のテキスト 😀\n" * 3, "x = 12345\n\t\ty = 'é'\n",
                  "a literal '<s>' or '</s>' in a document is text, not a special token\n"]


@pytest.fixture(scope="module")
def sp_model(data_dir) -> Path:
    return data_dir / "tokenizer.model"


def write_corpus(root: Path, docs: list[str], fmt: str, *, key: str = "text") -> Path:
    """The same documents in one format; two files, so that file order matters too."""
    root.mkdir(parents=True)
    half = len(docs) // 2
    parts = [docs[:half], docs[half:]]
    for k, part in enumerate(parts):
        if fmt == "text":
            for i, d in enumerate(part):
                (root / f"{k}_{i:04d}.txt").write_text(d)
        elif fmt in ("jsonl", "jsonl.gz"):
            lines = "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(part)).encode()
            path = root / f"part{k}.{fmt}"
            path.write_bytes(gzip.compress(lines) if fmt.endswith("gz") else lines)
        else:
            pq.write_table(pa.table({key: part, "id": list(range(len(part)))}), root / f"part{k}.parquet",
                           row_group_size=37)
    return root


def prep(corpus, out, **kw):
    kw.setdefault("val_fraction", 0.1)
    return prepare_data(str(corpus), out, TEST_VOCAB, progress=False, **kw)


def expected_tokens(docs, sp_path):
    """The reference: every document encoded on its own, EOS after each, split by the held-out rule."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    encoded = [sp.encode(d) + [sp.eos_id()] for d in docs]
    val = is_val_doc(np.arange(len(docs)), 10)
    pick = lambda want: np.array([t for e, v in zip(encoded, val) if v == want for t in e], dtype=np.uint16)
    return pick(False), pick(True), int(val.sum())


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "meta.json"}


# -- formats and tokenizers --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["text", "jsonl", "jsonl.gz", "parquet"])
def test_each_format_gives_the_reference_tokens(fmt, docs, sp_model, tmp_path):
    corpus = write_corpus(tmp_path / "c", docs, fmt)
    meta = prep(corpus, tmp_path / "d", tokenizer=str(sp_model))
    data = TokenData(tmp_path / "d", vocab_size=TEST_VOCAB)
    train, val, n_val = expected_tokens(docs, sp_model)
    assert np.array_equal(data.train.read(0, len(data.train)), train)
    assert np.array_equal(data.val.read(0, len(data.val)), val)
    assert meta["documents"] == len(docs) and meta["splits"]["val"]["docs"] == n_val
    idx = np.fromfile(tmp_path / "d" / "val.idx", dtype=np.uint64)
    assert len(idx) == n_val + 1 and idx[-1] == len(val)
    assert np.all(np.asarray(val)[idx[1:].astype(np.int64) - 1] == 2)  # every document ends with EOS
    # the existing tokenizer is used as is, not trained
    assert (tmp_path / "d" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(sp_model.read_bytes()).hexdigest()


def test_glob_and_text_key(docs, sp_model, tmp_path):
    corpus = write_corpus(tmp_path / "c", docs, "jsonl", key="content")
    (tmp_path / "c" / "notes.md").write_text("not matched by the glob")
    meta = prep(f"{tmp_path}/c/*.jsonl", tmp_path / "d", tokenizer=str(sp_model), text_key="content")
    assert meta["documents"] == len(docs) and len(meta["sources"]) == 2


def test_hf_tokenizer_json_gives_the_same_tokens_as_its_sentencepiece_model(docs, sp_model, tmp_path):
    from engine.data import sentencepiece_to_hf

    sentencepiece_to_hf(sp_model.read_bytes()).save(str(tmp_path / "tokenizer.json"))
    corpus = write_corpus(tmp_path / "c", docs, "parquet")
    prep(corpus, tmp_path / "sp", tokenizer=str(sp_model))
    meta = prep(corpus, tmp_path / "hf", tokenizer=str(tmp_path / "tokenizer.json"))
    assert meta["tokenizer"]["kind"] == "hf" and (tmp_path / "hf" / "tokenizer.json").is_file()
    for name in ("train_00000.bin", "val_00000.bin", "train.idx", "val.idx"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "sp" / name).read_bytes(), name


def test_vocab_mismatch_names_both(sp_model, docs, tmp_path):
    corpus = write_corpus(tmp_path / "c", docs[:20], "jsonl")
    with pytest.raises(DataError, match=r"tokenizer '.*tokenizer.model' has a vocabulary of 512 but "
                                        r"model.vocab_size is 600; set model.vocab_size=512"):
        prepare_data(str(corpus), tmp_path / "d", 600, tokenizer=str(sp_model), progress=False)
    assert not (tmp_path / "d").exists()


def test_trained_tokenizer_is_deterministic_from_a_bounded_sample(docs, tmp_path):
    corpus = write_corpus(tmp_path / "c", docs, "jsonl")
    a = prep(corpus, tmp_path / "a", sample_lines=3000)
    b = prep(corpus, tmp_path / "b", sample_lines=3000, workers=2)
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"] and a["tokenizer"]["origin"] == "trained"
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


# -- parallel, streaming preparation ---------------------------------------------------------------
def test_one_and_two_workers_write_identical_bytes(docs, sp_model, tmp_path):
    corpus = write_corpus(tmp_path / "c", docs, "jsonl.gz")
    kw = dict(tokenizer=str(sp_model), chunk_bytes=4096, shard_tokens=20_000)  # many chunks, several shards
    m1 = prep(corpus, tmp_path / "w1", workers=1, **kw)
    m2 = prep(corpus, tmp_path / "w2", workers=2, **kw)
    assert len(m1["splits"]["train"]["shards"]) > 3
    assert files_of(tmp_path / "w1") == files_of(tmp_path / "w2")
    drop = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "workers")}
    assert drop(m1) == drop(m2)
    # a window read across a shard boundary is the flat stream's
    d = TokenData(tmp_path / "w1")
    flat = np.concatenate([np.fromfile(tmp_path / "w1" / s["file"], dtype=np.uint16)
                           for s in m1["splits"]["train"]["shards"]])
    assert np.array_equal(d.train.read(19_990, 20_010), flat[19_990:20_010])


def test_memory_stays_bounded_on_a_corpus_many_times_larger(docs, sp_model, tmp_path):
    """A 3 MB corpus prepared under tracemalloc: the peak of Python and numpy allocations stays under a
    quarter of the corpus (it is set by the chunk size, not the corpus size)."""
    root = tmp_path / "c"
    root.mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    reps = 3_000_000 // len(lines) + 1
    with open(root / "big.jsonl", "wb") as f:
        for _ in range(reps):
            f.write(lines)
    size = (root / "big.jsonl").stat().st_size
    tracemalloc.start()
    try:
        meta = prep(root, tmp_path / "d", tokenizer=str(sp_model), chunk_bytes=8 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["documents"] == reps * len(docs)
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB corpus"


# -- sampling --------------------------------------------------------------------------------------
def test_permutation_is_a_bijection():
    for n in (1, 2, 7, 1000, 4097):
        out = permute(np.arange(n), n, hashlib.sha256(b"k").digest())
        assert sorted(out.tolist()) == list(range(n))
    a = permute(np.arange(1000), 1000, hashlib.sha256(b"a").digest())
    assert not np.array_equal(a, permute(np.arange(1000), 1000, hashlib.sha256(b"b").digest()))


def test_no_sequence_repeats_within_an_epoch(data_dir):
    mix = open_sources([str(data_dir)], None, vocab_size=TEST_VOCAB)
    T, B = 64, 16
    n = mix.first.n_windows(T)
    starts = mix._window_starts(0, np.arange(2 * n), seed=3, seq_len=T)
    first, second = starts[:n], starts[n:]
    assert sorted(first) == sorted(second) == [i * T for i in range(n)]  # each window once per epoch
    assert first[:50] != second[:50]                                       # in a new order each epoch
    for step in (0, n // B):  # the batches are those windows, in that order
        x, y = mix.train_batch(step, seed=3, batch_size=B, seq_len=T)
        for row, (xr, yr) in enumerate(zip(x, y)):
            w = mix.first.train.read(starts[step * B + row], starts[step * B + row] + T + 1)
            assert xr.tolist() == w[:-1].tolist() and yr.tolist() == w[1:].tolist()
    assert mix.position(n, T)["epoch"] == 1.0


def test_batches_are_a_pure_function_of_seed_and_step(data_dir):
    a = open_sources([str(data_dir)], None, vocab_size=TEST_VOCAB)
    b = open_sources([str(data_dir)], None, vocab_size=TEST_VOCAB)
    for step in (0, 5, 999):
        assert all((u == v).all() for u, v in zip(a.train_batch(step, seed=1, batch_size=8, seq_len=32),
                                                 b.train_batch(step, seed=1, batch_size=8, seq_len=32)))
    assert not (a.train_batch(0, seed=1, batch_size=8, seq_len=32)[0] ==
                a.train_batch(0, seed=2, batch_size=8, seq_len=32)[0]).all()


# -- blending --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sources(docs, sp_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("blend")
    half = len(docs) // 2
    a = prep(write_corpus(root / "ca", docs[:half], "jsonl"), root / "a", tokenizer=str(sp_model))
    b = prep(write_corpus(root / "cb", docs[half:], "parquet"), root / "b", tokenizer=str(sp_model))
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    return root / "a", root / "b"


def test_blend_proportions_and_sources(two_sources):
    mix = open_sources([str(p) for p in two_sources], [0.7, 0.3], vocab_size=TEST_VOCAB)
    src, _ = mix._locate(np.arange(20_000))
    assert abs((src == 0).mean() - 0.7) < 0.001                      # stated tolerance: 0.1 %
    for lo in range(0, 20_000, 1000):                                # and over every window of 1000 samples
        assert abs((src[lo:lo + 1000] == 0).mean() - 0.7) < 0.01
    # each row really comes from its source: a window of that source's train tokens
    T = 16
    x, _ = mix.train_batch(7, seed=0, batch_size=32, seq_len=T)
    src, _ = mix._locate(np.arange(7 * 32, 8 * 32))
    for row, d in zip(x.numpy(), src):
        flat = mix.sources[d].train.read(0, len(mix.sources[d].train))
        hits = np.nonzero(flat[:len(flat) - T] == row[0])[0]
        assert any(np.array_equal(flat[h:h + T], row) for h in hits if h % T == 0)


def test_blended_training_resumes_exactly(two_sources, tmp_path):
    blend = [f"data.sources=[{two_sources[0]},{two_sources[1]}]", "data.weights=[0.7,0.3]"]
    args = lambda run, *extra: [*SMALL_MODEL, *blend, f"run_dir={tmp_path / run}", "train.max_steps=4", *extra]
    straight = train_in_process(args("a"))
    train_in_process(args("b", "train.stop_at=2"))
    train_in_process(args("b", "checkpoint.resume=auto"))
    assert losses(read_metrics(tmp_path / "b")) == losses(straight)
    assert grad_norms(read_metrics(tmp_path / "b")) == grad_norms(straight)
    rec = straight[-1]
    assert rec["tokens_seen"] == 4 * 8 * 32 and len(rec["source_epochs"]) == 2 and rec["epoch"] > 0


# -- bad input -------------------------------------------------------------------------------------
def assert_nothing_left(tmp_path: Path, out: str = "d") -> None:
    assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob(f".{out}.tmp-*"))


def test_invalid_json_line_names_file_and_line_or_is_skipped(docs, sp_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", docs[:10], "jsonl")
    with open(corpus / "part1.jsonl", "a") as f:
        f.write('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"part1.jsonl:7: invalid JSON .* set data.skip_bad=true"):
        prep(corpus, tmp_path / "d", tokenizer=str(sp_model))
    assert_nothing_left(tmp_path)
    meta = prepare_data(str(corpus), tmp_path / "d", TEST_VOCAB, tokenizer=str(sp_model), skip_bad=True,
                        val_fraction=0.1)
    assert meta["skipped_bad_json"] == 1 and meta["documents"] == 11
    assert "1 invalid JSON lines skipped" in capsys.readouterr().out


def test_missing_text_key_or_column(docs, sp_model, tmp_path):
    with pytest.raises(DataError, match=r"part0.jsonl:1: no key 'text' .*it has: body, id.* set data.text_key"):
        prep(write_corpus(tmp_path / "j", docs[:10], "jsonl", key="body"), tmp_path / "d", tokenizer=str(sp_model))
    with pytest.raises(DataError, match=r"part0.parquet has no column 'text' \(columns: body, id\); set data.text_key"):
        prep(write_corpus(tmp_path / "p", docs[:10], "parquet", key="body"), tmp_path / "d", tokenizer=str(sp_model))
    assert_nothing_left(tmp_path)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"glob '.*\*.parquet' matches no files; fix the pattern"):
        prep(f"{tmp_path}/*.parquet", tmp_path / "d")


def test_empty_documents_and_invalid_utf8_are_counted(docs, sp_model, tmp_path):
    corpus = write_corpus(tmp_path / "c", docs[:20], "text")
    (corpus / "empty.txt").write_text("  \n")
    (corpus / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with open(corpus / "blank.jsonl", "w") as f:
        f.write('{"text": ""}\n\n{"text": null}\n')
    meta = prep(corpus, tmp_path / "d", tokenizer=str(sp_model))
    assert (meta["skipped_empty"], meta["replaced_utf8_docs"], meta["documents"]) == (3, 1, 21)


def test_tokenizer_that_does_not_load(docs, tmp_path):
    corpus = write_corpus(tmp_path / "c", docs[:10], "jsonl")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    for bad in ("bad.model", "bad.json"):
        with pytest.raises(DataError, match=rf"data.tokenizer='.*{bad}' does not load as a .* point data.tokenizer"):
            prep(corpus, tmp_path / "d", tokenizer=str(tmp_path / bad))
        assert_nothing_left(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere.model")


def test_sources_with_different_tokenizers_and_bad_weights(two_sources, data_dir, docs, tmp_path):
    other = tmp_path / "other"
    prepare_data(str(write_corpus(tmp_path / "c", docs, "jsonl")), other, TEST_VOCAB, val_fraction=0.1,
                 sample_lines=2000, progress=False)
    a, b = map(str, two_sources)
    with pytest.raises(DataError, match=rf"data.sources '{a}' and '{other}' were prepared with different tokenizers"):
        open_sources([a, str(other)], None, vocab_size=TEST_VOCAB)
    with pytest.raises(DataError, match="data.weights has 1 entries but data.sources has 2"):
        open_sources([a, b], [1.0], vocab_size=TEST_VOCAB)
    with pytest.raises(DataError, match=r"data.weights=\[0.5, 0.0\] must all be positive"):
        open_sources([a, b], [0.5, 0.0], vocab_size=TEST_VOCAB)
    with pytest.raises(DataError, match=r"data.weights=\[1.0, -1.0\] must all be positive"):
        open_sources([a, b], [1.0, -1.0], vocab_size=TEST_VOCAB)


def test_prepared_directory_is_checked_on_open(two_sources, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(two_sources[0], d)
    shard = d / "train_00000.bin"
    full = shard.read_bytes()
    shard.write_bytes(full[:-2])
    with pytest.raises(DataError, match=r"train_00000.bin holds .* bytes but meta.json says .* truncated"):
        TokenData(d)
    shard.unlink()
    with pytest.raises(DataError, match="train_00000.bin is missing"):
        TokenData(d)
    shard.write_bytes(full)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "format": "tandem-data/9"}))
    with pytest.raises(DataError, match="format 'tandem-data/9', which this version does not read"):
        TokenData(d)
    meta["splits"]["train"]["max_id"] = TEST_VOCAB
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="token id 512 is not below the vocabulary size 512"):
        TokenData(d)


def test_ids_and_the_eval_size_are_checked_on_open_not_per_read(data_dir, tmp_path):
    """A rank reads only its slice, so nothing may fail per read: ids are checked when a directory is
    opened (tandem-data/2 from meta's max_id; tandem-data/1, which records none, by one chunked scan),
    and the val split against a whole evaluation by `check_eval`, which the trainer calls at launch."""
    from tests.support.data_dirs import flat_format_copy

    new = open_sources([str(data_dir)], None, vocab_size=TEST_VOCAB)
    old = open_sources([str(flat_format_copy(data_dir, tmp_path / "flat"))], None, vocab_size=TEST_VOCAB)
    assert torch.equal(old.train_rows(2, seed=1, batch_size=8, seq_len=32),
                       new.train_rows(2, seed=1, batch_size=8, seq_len=32))
    bad = flat_format_copy(data_dir, tmp_path / "bad", train_ids={12345: TEST_VOCAB + 3})
    with pytest.raises(DataError, match=r"bad/train: token id 515 is not below the vocabulary size 512; .*prepare it again"):
        TokenData(bad)

    fits = (len(new.first.val) - 1) // 32 // 8   # whole global batches of 8 windows of 32 tokens
    new.check_eval(fits, batch_size=8, seq_len=32)
    with pytest.raises(DataError, match=rf"val split .* has {len(new.first.val)} tokens but eval needs "
                                        rf"{(fits + 1) * 8 * 32 + 1} .*lower eval.batches"):
        new.check_eval(fits + 1, batch_size=8, seq_len=32)


# -- preparing inside a launch ---------------------------------------------------------------------
def test_other_ranks_wait_on_a_file_flag(docs, sp_model, tmp_path):
    """Rank 0 prepares while rank 1 polls for meta.json; if rank 0 fails, rank 1 stops with its error."""
    barrier = threading.Barrier(2)
    corpus = write_corpus(tmp_path / "c", docs, "jsonl")
    kw = dict(corpus=str(corpus), vocab_size=TEST_VOCAB, tokenizer=str(sp_model), val_fraction=0.1, progress=False)
    errors = []

    def rank(r, out, **extra):
        try:
            prepare_once(out, rank=r, barrier=barrier.wait, **{**kw, **extra})
        except DataError as e:
            errors.append((r, str(e)))

    threads = [threading.Thread(target=rank, args=(r, tmp_path / "d")) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors and TokenData(tmp_path / "d").meta["documents"] == len(docs)
    threads = [threading.Thread(target=rank, args=(r, tmp_path / "e"), kwargs={"text_key": "nope"}) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(r for r, _ in errors) == [0, 1]
    assert any(r == 1 and "rank 0 failed to prepare" in m and "no key 'nope'" in m for r, m in errors)
    assert_nothing_left(tmp_path, "e")


def test_a_dp_rank_reads_exactly_its_rows_of_the_batch(data_dir):
    """train_rows(first, count) is rows first..first+count-1 of the whole batch, as one (n, T + 1)
    window tensor whose [:, :-1] / [:, 1:] are train_batch's inputs / targets."""
    mix = open_sources([str(data_dir)], None, vocab_size=TEST_VOCAB)
    x, y = mix.train_batch(3, seed=1, batch_size=8, seq_len=32)
    for first, count in ((0, 4), (4, 4), (5, 3)):
        w = mix.train_rows(3, seed=1, batch_size=8, seq_len=32, first=first, count=count)
        assert w.shape == (count, 33)
        assert torch.equal(w[:, :-1], x[first:first + count]) and torch.equal(w[:, 1:], y[first:first + count])
    with pytest.raises(ValueError, match="outside a batch of 8"):
        mix.train_rows(3, seed=1, batch_size=8, seq_len=32, first=6, count=4)


def _fake_mesh(device, *, dp=2, dp_rank=1, pp_rank=0, pp=1):
    from types import SimpleNamespace
    return SimpleNamespace(device=torch.device(device), dp=dp, dp_rank=dp_rank,
                           is_first_stage=pp_rank == 0, is_last_stage=pp_rank == pp - 1)


def test_each_rank_reads_only_its_slice_and_copies_it_once(monkeypatch):
    """engine.data.device.local_batch: dp rank 1 of 2 asks for rows 4..7 of a global 8, once; a middle
    pipeline stage reads nothing; on CUDA the one copy goes from pinned memory, non-blocking (the
    copy is stubbed here: the CPU build has no CUDA), on a CPU it is the tensor as read."""
    from engine.data.device import local_batch

    calls = []
    def read(first, count):
        calls.append((first, count))
        return torch.arange(first * 5, (first + count) * 5).reshape(count, 5)

    x, y = local_batch(read, _fake_mesh("cpu"), 8)
    assert calls == [(4, 4)] and x.tolist()[0] == [20, 21, 22, 23] and y.tolist()[0] == [21, 22, 23, 24]
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()   # one tensor, two views
    calls.clear()
    assert local_batch(read, _fake_mesh("cpu", pp_rank=1, pp=3), 8) == (None, None) and calls == []
    x, y = local_batch(read, _fake_mesh("cpu", pp_rank=2, pp=3), 8)
    assert x is None and y.shape == (4, 4)

    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: copies.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((str(a[0]), k)) or self)
    x, y = local_batch(read, _fake_mesh("cuda"), 8)
    assert copies == ["pin", ("cuda", {"non_blocking": True})], copies
