"""Every experiment config composes, trains two steps, checkpoints, resumes exactly and evaluates to its metrics.

Real datasets run on tiny fixtures in their official formats (tests/fixtures.py).
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import DENSE_WRITERS, GRAPH_WRITERS, TABULAR_WRITERS, WRITERS
from lightning.pytorch.callbacks import Callback

from experiments.evaluate import main as evaluate_main
from experiments.run import run
from mtl_lightning.config import compose, list_experiments
from mtl_lightning.data import create_datamodule

# The same family, smaller, where the paper's backbone would dominate the suite's CPU time (a dilated ResNet-50 at
# NYUv2's 288x384: ~30 s a step here); the config's other keys (output stride, optimiser, schedule) still apply.
LIGHTER = {exp: ["model.backbone=resnet10t"] for exp in ("nyuv2_mtl", "nyuv2_forkmerge")}
LIGHTER["nyuv2_forkmerge"] += ["weighting.pruning_epochs=1", "weighting.topk=[0,1]"]  # pruning runs, 1 epoch each
LIGHTER.update({exp: ["model.backbone=resnet10t"] for exp in ("nyuv2_deeplab", "cityscapes_deeplab")})
# undilated (stride 32: ~5x fewer FLOPs at NYUv2's size) where the dilated ResNet would dominate; nyuv2_mtl and
# cityscapes_deeplab keep the configs' output stride 8
LIGHTER["nyuv2_forkmerge"] += ["model.kwargs={output_stride: 32}"]
LIGHTER["nyuv2_deeplab"] += ["model.kwargs={output_stride: 32}"]
LIGHTER.update({exp: ["model.widths=[4,8,8,8,8]"] for exp in ("nyuv2_mtan", "cityscapes_mtan")})  # MTAN, narrow
LIGHTER["qm9_mtl"] = ["data.test_size=10", "data.val_size=10", "model.width=16"]  # the fixture's 59 molecules
LIGHTER["synthetic_graphs"] = ["data.size=64", "data.test_size=16", "data.val_size=16"]
# the fixtures hold tens of images: a validation hold-out and labels per class that fit them
LIGHTER["cifar10_ssl"] = ["data.val_count=20", "data.labels_per_class=2", "data.epoch_size=64"]
LIGHTER["svhn_ssl"] = ["data.val_count=2", "data.labels_per_class=1", "data.epoch_size=64"]
# a ViT-S of 2 blocks at width 64 for the ViT-S configs (the step, the checkpoints: ~10x smaller); embedded shapes
# at a few scenes (drawing 2,800 of them and testing on 400 cost more than the two steps)
LIGHTER.update({exp: ["model.depth=2", "model.width=64"] for exp in ("celeba_mtl", "taskonomy_mtl")})
LIGHTER["shapes_dense"] = ["data.train_size=64", "data.val_size=16", "data.test_size=16"]
# ForkMerge's checkpoints hold every branch and its optimiser state: writing them was most of these runs' time
LIGHTER["domainnet_forkmerge"] = ["weighting.val_batches=1", "model.backbone=resnet10t"]


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


@pytest.mark.parametrize("exp", list_experiments())
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
