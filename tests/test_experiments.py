"""One smoke run of every experiment config: it composes, trains two steps, evaluates and checkpoints."""

import math
from pathlib import Path

import pytest

from experiments.run import run
from mtl_lightning.config import list_experiments
from mtl_lightning.data import create_datamodule


@pytest.mark.parametrize("exp", list_experiments())
def test_experiment_smoke(exp, make_cfg):
    cfg = make_cfg(exp, "trainer.max_steps=2", "trainer.limit_val_batches=1")
    m = run(cfg)
    tasks = [t.name for t in create_datamodule(cfg.data).tasks]
    for stage in ("val", "test"):
        for t in tasks:
            assert 0.0 <= m[f"{stage}/acc/{t}"] <= 1.0 and math.isfinite(m[f"{stage}/loss/{t}"])
    assert (Path(m["run_dir"]) / "checkpoints" / "last.ckpt").is_file()
