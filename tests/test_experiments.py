"""Every experiment config composes, trains two steps, checkpoints, resumes exactly and evaluates to its metrics.

Real datasets run on tiny fixtures in their official formats (tests/fixtures.py).
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import DENSE_WRITERS, GRAPH_WRITERS, LIGHTER, TABULAR_WRITERS, WRITERS
from lightning.pytorch.callbacks import Callback

from experiments.evaluate import main as evaluate_main
from experiments.run import run
from mtl_lightning.config import compose, list_experiments
from mtl_lightning.data import create_datamodule


class Snapshot(Callback):
    """A copy of last.ckpt as it stands at the first training step (written there by checkpoint.every_n_steps=1),
    beside it in the run's checkpoints/: resuming from it continues that run, as a user's resume=PATH does."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        folder = Path(trainer.default_root_dir) / "checkpoints"
        if trainer.global_step >= 1 and (folder / "last.ckpt").is_file() and not (folder / "step1.ckpt").exists():
            shutil.copy(folder / "last.ckpt", folder / "step1.ckpt")


def smoke_cfg(exp, make_cfg, tmp_path, *extra, out_dir):
    data = []  # real datasets train on a tiny fixture in their official format
    writers = {**WRITERS, **DENSE_WRITERS, **TABULAR_WRITERS, **GRAPH_WRITERS}.get(compose(exp).data.name, [])
    if writers:
        if not (tmp_path / "data").exists():  # once for both runs
            for write in writers:
                write(tmp_path / "data")
        data = [f"data.root={tmp_path / 'data'}"]
    # tests never download: pretrained backbones (the papers' settings) train from scratch here; training batches of 2
    # (the papers' 256 would make a step of CelebA's ViT-S/4 or DomainNet's ResNet-26 cost seconds each)
    over = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "model.pretrained=false", *LIGHTER.get(exp, [])]
    over += ["data.batch_size=2", "checkpoint.every_n_steps=1"]
    return make_cfg(exp, *over, *data, *extra, out_dir=out_dir)


# a task's metric computed from no sample (its domain missing from every evaluated batch) is an error
@pytest.mark.parametrize("exp", list_experiments())
@pytest.mark.filterwarnings("error:The ``compute`` method:UserWarning")
def test_experiment_trains_resumes_exactly_and_evaluates(exp, make_cfg, tmp_path):
    """Every experiment config (issue 35: runs without images could be neither resumed nor evaluated) trains two
    steps; a run resumed from its step-1 checkpoint ends with the uninterrupted run's numbers; `evaluate` of the
    resumed run gives its metrics.json."""
    cfg = smoke_cfg(exp, make_cfg, tmp_path, out_dir=tmp_path / "a")
    full = run(cfg, callbacks=[Snapshot()])
    snap = Path(full["run_dir"]) / "checkpoints" / "step1.ckpt"
    for stage in ("val", "test"):
        for t in create_datamodule(cfg.data).tasks:
            assert math.isfinite(full[f"{stage}/loss/{t.name}"])
            for metric in t.metrics:  # every metric of every task is logged, and finite
                assert math.isfinite(full[t.key(stage, metric)])
    assert (Path(full["run_dir"]) / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(snap, weights_only=False, map_location="cpu")["global_step"] >= 1

    # the same run continued from its step-1 checkpoint (ForkMerge's pruning results are reused, not redone)
    resumed = run(smoke_cfg(exp, make_cfg, tmp_path, f"resume={snap}", out_dir=tmp_path / "a"))
    assert resumed["run_dir"] == full["run_dir"]
    numbers = sorted(k for k in full if k.startswith(("val/", "test/")))
    assert numbers and numbers == sorted(k for k in resumed if k.startswith(("val/", "test/")))
    for k in numbers:
        assert resumed[k] == pytest.approx(full[k], rel=1e-4, abs=1e-5, nan_ok=True), k

    out = tmp_path / "eval.json"
    assert evaluate_main([resumed["run_dir"], "--out", str(out)]) == 0
    evaluated, written = (
        json.loads(out.read_text()),
        json.loads((Path(resumed["run_dir"]) / "metrics.json").read_text()),
    )
    for k in numbers:
        assert evaluated[k] == pytest.approx(written[k], rel=1e-4, abs=1e-5, nan_ok=True), k
