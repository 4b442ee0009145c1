"""Prepare a corpus: `python scripts/prepare_data.py [data.corpus=DIR|stdlib] [data.dir=OUT] [model=...]`.

Trains a SentencePiece BPE tokenizer of size model.vocab_size and writes the flat token files.
The training launch does this itself when data.dir is not prepared yet.
"""
import hydra

from engine.config import register_configs, to_config
from engine.data import prepare_data

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    c = to_config(cfg)
    prepare_data(c.data.corpus, c.data.dir, c.model.build().vocab_size)


if __name__ == "__main__":
    main()
