"""Reading a corpus: which files (``stdlib``, a file, a directory or a glob) and their documents.

Formats by extension: plain text (one document per file), ``.jsonl`` / ``.jsonl.gz`` (one JSON object
per line, text under ``text_key``) and ``.parquet`` (column ``text_key``, read in record batches).

The reader yields `Chunk`s of raw, undecoded documents in a fixed order; decoding (JSON, UTF-8) happens
in `decode_chunk`, which the preparation workers run, so the reading process stays light.
"""
from __future__ import annotations

import glob
import gzip
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from engine.data.errors import DataError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml"}
FORMATS = "plain text (" + ", ".join(sorted(TEXT_SUFFIXES)) + "), .jsonl, .jsonl.gz, .parquet"


def file_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text" if path.suffix in TEXT_SUFFIXES else None


def corpus_files(corpus: str) -> list[Path]:
    """The files of ``data.corpus``: ``stdlib`` (this Python's standard library), a file, a directory
    (searched recursively) or a glob (``/data/*.parquet``, ``**`` allowed). Sorted: the order is part of
    the prepared output."""
    if corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    path = Path(corpus).expanduser()
    if any(ch in corpus for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.corpus glob {corpus!r} matches no files; fix the pattern (quote it so the "
                            f"shell does not expand it) or point data.corpus at a file or directory")
    elif path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p))
    else:
        raise DataError(f"corpus directory {str(path)!r} does not exist; set data.corpus to a directory of "
                        f"text files, a file, a glob, or 'stdlib' for the built-in corpus")
    unknown = [p for p in files if not file_format(p)]
    if unknown:
        raise DataError(f"{str(unknown[0])!r} has a format data.corpus cannot read; use one of {FORMATS}")
    if not files:
        raise DataError(f"corpus {corpus!r} holds no text files ({FORMATS}); add some or set data.corpus "
                        f"to another directory")
    return files


@dataclass
class Chunk:
    """Consecutive raw documents of one file: ``items`` are bytes (a text file, or JSONL lines) or
    str/None (Parquet cells). ``first`` is the 1-based line (JSONL) or row (Parquet) of items[0];
    ``disk_bytes`` how far the chunk advances through the file on disk (for progress)."""

    path: str
    fmt: str
    first: int
    items: list = field(default_factory=list)
    disk_bytes: int = 0


def read_chunks(files: list[Path], *, text_key: str, chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """All documents of ``files``, in order, as chunks of about ``chunk_bytes`` of raw text."""
    pending = Chunk("", "text", 1)
    size = 0
    for f in files:
        fmt = file_format(f)
        if fmt == "text":  # one document per file: batch small files together
            if pending.items and size + f.stat().st_size > chunk_bytes:
                yield pending
                pending, size = Chunk("", "text", 1), 0
            data = f.read_bytes()
            if b"\0" in data:  # no text format holds NUL bytes; a tokenizer would learn the binary
                raise DataError(f"{f} holds NUL bytes: it is a binary file, not text; remove it from data.corpus "
                                f"or point data.corpus at a glob that leaves it out")
            pending.items.append(data)
            pending.disk_bytes += f.stat().st_size
            pending.path = pending.path or str(f)
            size += f.stat().st_size
            continue
        yield from (_jsonl_chunks(f, chunk_bytes) if fmt == "jsonl" else _parquet_chunks(f, text_key, chunk_bytes))
    if pending.items:
        yield pending


def _jsonl_chunks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        chunk, size, pos = Chunk(str(path), "jsonl", 1), 0, 0
        try:
            for lineno, line in enumerate(stream, 1):
                chunk.items.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    chunk.disk_bytes, pos = raw.tell() - pos, raw.tell()
                    yield chunk
                    chunk, size = Chunk(str(path), "jsonl", lineno + 1), 0
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz
            raise DataError(f"{path}: cannot read ({e}); re-download or re-compress the file, or remove it "
                            f"from data.corpus") from e
        chunk.disk_bytes = raw.tell() - pos
        if chunk.items:
            yield chunk


def _parquet_chunks(path: Path, text_key: str, chunk_bytes: int) -> Iterator[Chunk]:
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e}); fix or remove it from data.corpus") from e
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(f"{path} has no column {text_key!r} (columns: {', '.join(names)}); set "
                        f"data.text_key to the column that holds the text")
    rows, size = max(pf.metadata.num_rows, 1), path.stat().st_size
    row = 1
    # record batches of a few hundred rows: the whole file is never in memory
    for batch in pf.iter_batches(batch_size=max(64, chunk_bytes // 4096), columns=[text_key]):
        items = batch.column(0).to_pylist()
        yield Chunk(str(path), "parquet", row, items, disk_bytes=size * len(items) // rows)
        row += len(items)


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading .parquet needs pyarrow; `pip install pyarrow`") from e
    return pq


@dataclass
class DecodeStats:
    empty: int = 0          # documents with no text (skipped)
    bad_json: int = 0       # invalid JSON lines skipped under data.skip_bad=true
    bad_utf8: int = 0       # documents whose invalid UTF-8 bytes were replaced with U+FFFD

    def add(self, other: "DecodeStats") -> None:
        self.empty += other.empty
        self.bad_json += other.bad_json
        self.bad_utf8 += other.bad_utf8


def decode_chunk(chunk: Chunk, *, text_key: str, skip_bad: bool) -> tuple[list[str], DecodeStats]:
    """The chunk's non-empty documents as text, and what was skipped or repaired on the way."""
    stats, texts = DecodeStats(), []
    for k, item in enumerate(chunk.items):
        if chunk.fmt == "jsonl":
            item = _json_text(item, chunk.path, chunk.first + k, text_key, skip_bad, stats)
        elif isinstance(item, bytes):  # a text file, or a binary Parquet column
            item = _utf8(item, stats)
        elif item is None:  # a null Parquet cell: an empty document
            item = ""
        if item is None:  # a blank JSONL line or a skipped bad one: not a document
            continue
        if not item.strip():
            stats.empty += 1
            continue
        texts.append(item)
    return texts, stats


def _utf8(raw: bytes, stats: DecodeStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.bad_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _json_text(line: bytes, path: str, lineno: int, key: str, skip_bad: bool, stats: DecodeStats) -> str | None:
    """The text of one JSONL line; None for a blank line or a skipped bad one."""
    if not line.strip():
        return None
    try:
        obj = json.loads(_utf8(line, stats))
    except json.JSONDecodeError as e:
        if skip_bad:
            stats.bad_json += 1
            return None
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); fix the line, or set "
                        f"data.skip_bad=true to skip and count such lines") from None
    if not isinstance(obj, dict) or key not in obj:
        have = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}:{lineno}: no key {key!r} in the JSON object (it has: {have}); set "
                        f"data.text_key to the key that holds the text")
    text = obj[key]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: {key!r} holds a {type(text).__name__}, not text; set data.text_key "
                        f"to a key whose value is a string")
    return text or ""
