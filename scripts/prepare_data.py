"""Prepare a corpus: `python scripts/prepare_data.py data.corpus=PATH|GLOB|stdlib data.dir=OUT [model=...]
[data.tokenizer=PATH] [data.text_key=text] [data.workers=N] [data.skip_bad=true] [data.val_fraction=0.01]`.

Tokenizes the corpus (text files, .jsonl, .jsonl.gz, .parquet) into token shards, a document index and
meta.json, with the given tokenizer or a SentencePiece BPE of size model.vocab_size trained on a sample.
The output is the same for any data.workers. See docs/data.md.
"""
import sys

import hydra

from engine.config import register_configs, to_config
from engine.data import DataError, prepare_data

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    c = to_config(cfg)
    d = c.data
    try:
        prepare_data(d.corpus, d.dir, c.model.build().vocab_size, tokenizer=d.tokenizer, text_key=d.text_key,
                     workers=d.workers, skip_bad=d.skip_bad, val_fraction=d.val_fraction)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
