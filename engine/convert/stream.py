"""Streaming safetensors I/O: a file is written tensor by tensor, never held whole in memory.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (and copies each to
bytes while serializing), which would make a converter's peak memory one whole output shard, twice.
The format is simple enough to write incrementally: an 8-byte little-endian header length, a JSON
header giving each tensor's dtype, shape and byte range, then the raw bytes in that order. Since the
header needs only shapes and dtypes, we write it first and then each tensor as it is assembled,
hashing the bytes as they go out so the checksum costs no second read.

Reading goes straight from the file into the destination tensor (``readinto``) whenever the region
is one run of bytes, which it is for whole tensors and row blocks; other regions use
``safe_open(...).get_slice``, opened per read. A memory map would do too, but the pages it touches
count towards the resident set while it is open, doubling a tensor's footprint.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.checkpoint import CheckpointError

# torch dtype <-> safetensors dtype code
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {v: k for k, v in _CODES.items()}
# names as the manifest writes them (str(torch.float32) without the prefix) and as --dtype spells them
_NAMES = {str(d).removeprefix("torch."): d for d in _CODES}
_NAMES.update({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _NAMES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a file header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


def read_header(path: Path) -> tuple[dict[str, TensorSpec], dict]:
    """The tensors a safetensors file holds (no data read) and its ``__metadata__``."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024 * 1024:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}); it is truncated or "
                              f"corrupt — copy it again from its source") from None
    meta = header.pop("__metadata__", None) or {}
    end = 8 + n + max((info["data_offsets"][1] for info in header.values()), default=0)
    if path.stat().st_size < end:
        raise CheckpointError(f"{str(path)!r} is truncated: {path.stat().st_size} bytes where its header needs "
                              f"{end}; copy it again from its source")
    specs = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {str(path)!r} has dtype {info['dtype']}, which the "
                                  f"converter does not handle; convert it to F32/BF16/F16 first")
        specs[name] = TensorSpec(name, tuple(info["shape"]), _DTYPES[info["dtype"]])
    return specs, meta


@functools.lru_cache(maxsize=1024)
def _header_cached(path: str, mtime_ns: int, size: int) -> tuple[dict, int]:
    """Each tensor's (dtype, shape, absolute byte range) in ``path``; keyed by mtime and size too, so a
    rewritten file is read afresh."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"][0] + 8 + n) for k, v in header.items()}, n


def _contiguous(box: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    """Whether region ``box`` of a row-major tensor is one run of bytes: every dim after the last
    partial one is whole, every dim before it has extent one."""
    extents = [s.stop - s.start for s in box]
    partial = [i for i, (e, n) in enumerate(zip(extents, shape)) if e != n]
    return not partial or all(e == 1 for e in extents[:partial[-1]])


def read_into(path: Path, name: str, box: tuple[slice, ...] | None, out: torch.Tensor) -> None:
    """Copy region ``box`` (the whole tensor when None) of tensor ``name`` in ``path`` into ``out``.

    A region that is one run of bytes (a whole tensor, a block of rows) is read straight from the
    file with ``readinto`` — into ``out`` itself when it is contiguous and of the stored dtype, so the
    region is never in memory twice. Other regions go through ``safe_open(...).get_slice``.
    """
    st = os.stat(path)
    tensors, _ = _header_cached(str(path), st.st_mtime_ns, st.st_size)
    dtype, shape, start = tensors[name]
    box = box if box is not None else tuple(slice(0, n) for n in shape)
    if not _contiguous(box, shape):
        with safe_open(path, framework="pt") as f:
            out.copy_(f.get_slice(name)[box])
        return
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    first = sum(s.start * st_ for s, st_ in zip(box, strides))
    direct = out.is_contiguous() and out.dtype == dtype
    buf = out if direct else torch.empty(out.shape, dtype=dtype)
    view = buf.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb", buffering=0) as f:
        f.seek(start + first * buf.element_size())
        got = f.readinto(view)
    if got != view.nbytes:
        raise CheckpointError(f"{str(path)!r} ends inside tensor {name!r}; the file is truncated — copy it again")
    if not direct:
        out.copy_(buf)


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of file ``path``, read once into fresh memory."""
    st = os.stat(path)
    dtype, shape, _ = _header_cached(str(path), st.st_mtime_ns, st.st_size)[0][name]
    out = torch.empty(shape, dtype=dtype)
    read_into(path, name, None, out)
    return out


class StreamWriter:
    """Write one safetensors file tensor by tensor, in the order of ``specs``.

    The header goes out first; each `write` appends one tensor's bytes (converted to its spec's
    dtype). `close` checks that every tensor was written and returns (sha256, bytes).
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for s in self.specs:
            if s.name in header:
                raise ValueError(f"tensor {s.name!r} is listed twice for {self.path.name}")
            header[s.name] = {"dtype": _CODES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._hash = hashlib.sha256()
        self._f = open(self.path, "wb")
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _emit(self, data) -> None:
        self._hash.update(data)
        self._f.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path.name}: tensor {name!r} written beyond the planned list")
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{self.path.name}: expected tensor {spec.name!r} of shape {spec.shape}, got "
                                  f"{name!r} of shape {tuple(tensor.shape)}")
        t = tensor.detach().to(device="cpu", dtype=spec.dtype).contiguous().reshape(-1)
        self._emit(t.view(torch.uint8).numpy())  # no copy: the tensor's own buffer
        self._next += 1

    def close(self) -> tuple[str, int]:
        if self._next != len(self.specs):
            self._f.close()
            raise ValueError(f"{self.path.name}: only {self._next} of {len(self.specs)} tensors were written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._hash.hexdigest(), self.path.stat().st_size
