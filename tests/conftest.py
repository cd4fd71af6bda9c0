import os

import pytest

from mtl_lightning.config import compose

os.environ.setdefault("WANDB_MODE", "offline")  # tests never reach the network
os.environ.setdefault("WANDB_SILENT", "true")

QUIET = ["trainer.enable_progress_bar=false", "logger=csv"]


@pytest.fixture
def make_cfg(tmp_path):
    """compose(exp, overrides) writing into this test's tmp dir, quietly."""

    def make(exp: str, *overrides: str, out_dir=None):
        return compose(exp, [f"out_dir={out_dir or tmp_path / 'runs'}", *QUIET, *overrides])

    return make
