import os

import pytest

from mtl_lightning.config import compose

os.environ.setdefault("WANDB_MODE", "offline")  # tests never reach the network
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers on two cores, one thread each (and subprocesses)
    # a tiny model gains nothing from a second thread (a method-learning test: 33.2 s on 1 thread, 34.5 s on 2)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    # The Ray tests' modules carry xdist_group("ray"), so --dist loadgroup runs them in turn on one worker: two local
    # Ray clusters at once would share the two cores three ways, and the cluster test's `ray stop` ends every one.

QUIET = ["trainer.enable_progress_bar=false", "logger=csv"]


@pytest.fixture
def make_cfg(tmp_path):
    """compose(exp, overrides) writing into this test's tmp dir, quietly."""

    def make(exp: str, *overrides: str, out_dir=None):
        return compose(exp, [f"out_dir={out_dir or tmp_path / 'runs'}", *QUIET, *overrides])

    return make
