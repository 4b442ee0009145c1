"""Prepare a corpus: `python scripts/prepare_data.py [data.corpus=DIR|stdlib] [data.dir=OUT] [model=...] [data.force=true]`.

Trains a SentencePiece BPE tokenizer of size model.vocab_size and writes the flat token files.
The training launch does this itself when data.dir is not prepared yet. An already prepared
data.dir is refused unless data.force=true (or --force). Errors print `error: ...`, exit 2.
"""
import sys

import hydra

from engine.cli import run_cli
from engine.config import ConfigError, register_configs, to_config, validate, writable_destination
from engine.data import is_prepared, prepare_data

register_configs()


def prepare(cfg, force: bool) -> None:
    c = to_config(cfg)
    validate(c, purpose="prepare_data")
    writable_destination(c.data.dir, "data.dir")
    if is_prepared(c.data.dir) and not (force or c.data.force):
        raise ConfigError(f"data.dir={c.data.dir!r} is already prepared (it holds meta.json); replacing it changes "
                          f"the corpus and vocabulary under every run that uses it. Choose another data.dir, or "
                          f"pass data.force=true (or --force) to replace it")
    prepare_data(c.data.corpus, c.data.dir, c.model.build().vocab_size)


FORCE = "--force" in sys.argv
if FORCE:
    sys.argv.remove("--force")  # ours, not Hydra's


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    sys.exit(run_cli(prepare, cfg, FORCE))


if __name__ == "__main__":
    main()
