import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. Triton reads this
# when a kernel is defined (at the first import of kernels/ or models/), so it is set here, before any
# test module is imported; spawned test processes inherit it. With CUDA the kernels are compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEST_VOCAB = 512


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small real corpus: two standard-library packages (about 0.6 MB of Python)."""
    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email"):
        for f in (stdlib / pkg).glob("*.py"):
            shutil.copy(f, d / f"{pkg}_{f.name}")
    return d


@pytest.fixture(scope="session")
def data_dir(corpus_dir, tmp_path_factory) -> Path:
    """The small corpus, prepared once per session (vocab 512). Its 25 files are 25 documents: one in
    ten is held out for validation (the default 1 % would hold out none of so few)."""
    from engine.data import prepare_data

    d = tmp_path_factory.mktemp("data")
    prepare_data(str(corpus_dir), d, TEST_VOCAB, val_fraction=0.1, progress=False)
    return d
