"""The one error type of the data path."""


class DataError(ValueError):
    """A corpus, tokenizer or prepared data directory that cannot be used (the message says how to fix it)."""
