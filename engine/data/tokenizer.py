"""Tokenizers: a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (through the ``tokenizers``
library), loaded from bytes so preparation workers rebuild them cheaply; training a SentencePiece BPE on
a bounded reservoir sample; and the Hugging Face ``tokenizer.json`` equivalent of a SentencePiece BPE
model, so an exported checkpoint loads with ``transformers`` + ``tokenizers`` alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, normalizers, processors
from tokenizers import models as bpe_models  # not the project's models/ package

from engine.data.errors import DataError

SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
# end-of-document tokens of common Hugging Face tokenizers, tried in order when no config names one
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")


class Tokenizer:
    """One of two kinds, same interface: ``encode_batch``, ``vocab_size``, ``eos_id``."""

    def __init__(self, kind: str, blob: bytes, *, eos_token: str | None = None, origin: str = "?"):
        self.kind, self.blob, self.origin = kind, blob, origin
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.file_name = SP_FILE if kind == "sentencepiece" else HF_FILE
        if kind == "sentencepiece":
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
            self.vocab_size, self.eos_id = self._sp.get_piece_size(), self._sp.eos_id()
        else:
            self._hf = HFTokenizer.from_str(blob.decode("utf-8"))
            # a document that contains "<s>" or "<|end_of_text|>" means the characters, as SentencePiece
            # reads them: special tokens come only from the data path (EOS) and the model's user
            self._hf.encode_special_tokens = True
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.eos_id = _hf_eos_id(self._hf, eos_token, origin)
        self.eos_token = eos_token

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids without BOS or EOS. One thread: parallelism comes from the preparation workers."""
        if self.kind == "sentencepiece":
            return self._sp.encode(texts, num_threads=1)
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def state(self) -> tuple:
        """What a worker process needs to rebuild this tokenizer."""
        return self.kind, self.blob, self.eos_token, self.origin


def _hf_eos_id(tok, eos_token: str | None, origin: str) -> int:
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError(f"tokenizer {origin!r} has no end-of-document token ({', '.join(names)} not in its "
                    f"vocabulary); name it with an eos_token in a tokenizer_config.json beside it")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """``data.tokenizer=PATH``: a SentencePiece ``.model``, a ``tokenizer.json``, or a directory holding
    either (a Hugging Face model directory, a prepared data directory, a Tandem checkpoint)."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = [p / n for n in (HF_FILE, SP_FILE) if (p / n).is_file()]
        if not found:
            raise DataError(f"data.tokenizer={str(path)!r}: the directory holds neither {HF_FILE} nor {SP_FILE}; "
                            f"point data.tokenizer at one of them")
        p = found[0]
    if not p.is_file():
        raise DataError(f"data.tokenizer={str(path)!r} does not exist; point it at a SentencePiece .model or a "
                        f"Hugging Face tokenizer.json")
    kind = "hf" if p.suffix == ".json" else "sentencepiece"
    try:
        return Tokenizer(kind, p.read_bytes(), eos_token=_configured_eos(p.parent), origin=str(p))
    except DataError:
        raise
    except Exception as e:  # sentencepiece and tokenizers raise their own types for a bad file
        what = "Hugging Face tokenizer.json" if kind == "hf" else "SentencePiece model"
        raise DataError(f"data.tokenizer={str(path)!r} does not load as a {what} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the file, or point data.tokenizer "
                        f"at a valid .model or tokenizer.json") from e


def _configured_eos(directory: Path) -> str | None:
    cfg = directory / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    tok = json.loads(cfg.read_text()).get("eos_token")
    return tok.get("content") if isinstance(tok, dict) else tok


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
    if tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer {tok.origin!r} has a vocabulary of {tok.vocab_size} but model.vocab_size is "
                        f"{vocab_size}; set model.vocab_size={tok.vocab_size} or use a tokenizer of that size")


# -- training ------------------------------------------------------------------------------------
def reservoir_lines(texts: Iterable[str], k: int, *, seed: int = 0, max_line: int = 4096) -> list[str]:
    """A uniform sample of at most ``k`` non-blank lines (Algorithm R): memory is bounded by ``k``
    whatever the corpus size. Lines longer than SentencePiece's limit are cut."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            seen += 1
            if len(sample) < k:
                sample.append(line[:max_line])
            else:
                j = rng.randrange(seen)
                if j < k:
                    sample[j] = line[:max_line]
    return sample


def train_sentencepiece(lines: list[str], vocab_size: int, *, seed: int = 0) -> Tokenizer:
    """A SentencePiece BPE model with the settings STYLE.md lists for an LLM."""
    lines = list(lines)
    random.Random(seed).shuffle(lines)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, character_coverage=0.9999,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1,
        hard_vocab_limit=False, minloglevel=2)
    return Tokenizer("sentencepiece", model.getvalue(), origin="trained")


# -- export ----------------------------------------------------------------------------------------
def sentencepiece_to_hf(model: bytes):
    """The ``tokenizers`` equivalent of a SentencePiece BPE model: same vocabulary and ids, merges
    derived from the vocabulary (every split of a piece into two pieces, ranked by the piece's score,
    which is the order SentencePiece's BPE applies them), byte fallback, the ``▁`` space marker with
    SentencePiece's dummy prefix, and BOS added like Llama's. Needs no protobuf. Control tokens
    (``<s>``) written in the text are text to SentencePiece: encode with ``encode_special_tokens`` (in
    transformers, ``split_special_tokens``) for the same ids."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges = []
    for i in range(n):
        if i in special or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-sp.get_score(i), vocab[left], vocab[right], left, right))
    merges.sort()
    tok = HFTokenizer(bpe_models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], byte_fallback=True,
                                 unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    if sp.bos_id() >= 0:
        bos = sp.id_to_piece(sp.bos_id())
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, sp.bos_id())])
    return tok
