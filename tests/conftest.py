import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.support.launch import train_in_process

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. Triton reads this
# when a kernel is defined (at the first import of kernels/ or models/), so it is set here, before any
# test module is imported; spawned test processes inherit it. With CUDA the kernels are compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread in the pytest process, as every spawned rank (tests/support/distributed.py) and
# torchrun worker (OMP_NUM_THREADS=1) already has. The test models are tiny: a second OpenMP thread
# only spins. Measured (2-core CPU, torch 2.13, a 10-step serial run of SMALL_MODEL in process): 6 s of
# CPU with one thread against 22-27 s with two, and 4x the wall time when other processes share the
# cores. It also makes the serial references run like the launch workers they are compared with.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def serial_run(data_dir, tmp_path_factory):
    """The reference every launch test holds a layout against: ``serial_run(model, steps)`` trains the
    model (config overrides) for ``steps`` steps on the session's data, in this process (a world of
    one), and returns its records. Runs are cached by their arguments, so test files share them."""
    runs: dict[tuple, list[dict]] = {}

    def run(model: list[str], steps: int) -> list[dict]:
        key = (tuple(model), steps)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("serial")
            runs[key] = train_in_process([*model, f"data.dir={data_dir}", f"run_dir={run_dir}", f"train.max_steps={steps}"])
        return runs[key]

    return run
