"""Prepare a corpus: `python scripts/prepare_data.py data.corpus=PATH|GLOB|stdlib data.dir=OUT [model=...]
[data.tokenizer=PATH] [data.text_key=text] [data.workers=N] [data.skip_bad=true] [data.val_fraction=0.01]
[data.force=true | --force]`.

Tokenizes the corpus (text files, .jsonl, .jsonl.gz, .parquet) into token shards, a document index and
meta.json, with the given tokenizer or a SentencePiece BPE of size model.vocab_size trained on a sample.
The output is the same for any data.workers. See docs/data.md. An already prepared data.dir is refused
unless data.force=true (or --force). Errors print `error: ...` and exit 2.
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
    d = c.data
    writable_destination(d.dir, "data.dir")
    replace = force or d.force
    if is_prepared(d.dir) and not replace:
        raise ConfigError(f"data.dir={d.dir!r} is already prepared (it holds meta.json); replacing it changes "
                          f"the corpus and vocabulary under every run that uses it. Choose another data.dir, or "
                          f"pass data.force=true (or --force) to replace it")
    prepare_data(d.corpus, d.dir, c.model.build().vocab_size, tokenizer=d.tokenizer, text_key=d.text_key,
                 workers=d.workers, skip_bad=d.skip_bad, val_fraction=d.val_fraction, replace=replace)


FORCE = "--force" in sys.argv
if FORCE:
    sys.argv.remove("--force")  # ours, not Hydra's


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    sys.exit(run_cli(prepare, cfg, FORCE))


if __name__ == "__main__":
    main()
