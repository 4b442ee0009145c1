"""Token data: preparing corpora into token shards and reading them as a layout-independent stream.

``inputs``: which files and their documents (text, JSONL, Parquet). ``tokenizer``: SentencePiece or
Hugging Face tokenizers, training, export. ``prepare``: streaming parallel preparation into a versioned
directory. ``dataset``: reading a prepared directory, sampling without replacement, blending.
"""
from engine.data.dataset import DataMix, TokenData, open_sources, permute
from engine.data.errors import DataError
from engine.data.inputs import corpus_files
from engine.data.prepare import FORMAT, is_prepared, prepare_data
from engine.data.tokenizer import Tokenizer, load_tokenizer, sentencepiece_to_hf

__all__ = ["DataError", "DataMix", "TokenData", "open_sources", "permute", "corpus_files", "FORMAT",
           "is_prepared", "prepare_data", "Tokenizer", "load_tokenizer", "sentencepiece_to_hf"]
