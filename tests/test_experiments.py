"""One smoke run of every experiment config: it composes, trains two steps, evaluates and checkpoints.

Real datasets run on tiny fixtures in their official formats (tests/fixtures.py).
"""

import math
from pathlib import Path

import pytest
from fixtures import DENSE_WRITERS, GRAPH_WRITERS, TABULAR_WRITERS, WRITERS

from experiments.run import run
from mtl_lightning.config import compose, list_experiments
from mtl_lightning.data import create_datamodule

# The same family, smaller, where the paper's backbone would dominate the suite's CPU time (a dilated ResNet-50 at
# NYUv2's 288x384: ~30 s a step here); the config's other keys (output stride, optimiser, schedule) still apply.
LIGHTER = {exp: ["model.backbone=resnet18"] for exp in ("nyuv2_mtl", "nyuv2_forkmerge")}
LIGHTER["nyuv2_forkmerge"] += ["weighting.pruning_epochs=1", "weighting.topk=[0,1]"]  # pruning runs, 1 epoch each
LIGHTER.update({exp: ["model.backbone=resnet18"] for exp in ("nyuv2_deeplab", "cityscapes_deeplab")})
LIGHTER.update({exp: ["model.widths=[4,8,8,8,8]"] for exp in ("nyuv2_mtan", "cityscapes_mtan")})  # MTAN, narrow
LIGHTER["qm9_mtl"] = ["data.test_size=10", "data.val_size=10", "model.width=16"]  # the fixture's 59 molecules
LIGHTER["synthetic_graphs"] = ["data.size=64", "data.test_size=16", "data.val_size=16"]
# the fixtures hold tens of images: a validation hold-out and labels per class that fit them
LIGHTER["cifar10_ssl"] = ["data.val_count=20", "data.labels_per_class=2", "data.epoch_size=64"]
LIGHTER["svhn_ssl"] = ["data.val_count=2", "data.labels_per_class=1", "data.epoch_size=64"]


@pytest.mark.parametrize("exp", list_experiments())
def test_experiment_smoke(exp, make_cfg, tmp_path):
    data = []  # real datasets train on a tiny fixture in their official format
    for write in {**WRITERS, **DENSE_WRITERS, **TABULAR_WRITERS, **GRAPH_WRITERS}.get(compose(exp).data.name, []):
        write(tmp_path / "data")
        data = [f"data.root={tmp_path / 'data'}"]
    # tests never download: pretrained backbones (the papers' settings) train from scratch here; training batches of 2
    # (the papers' 256 would make a step of CelebA's ViT-S/4 or DomainNet's ResNet-26 cost seconds each)
    over = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "model.pretrained=false", *LIGHTER.get(exp, [])]
    over.append("data.batch_size=2")
    cfg = make_cfg(exp, *over, *data)
    m = run(cfg)
    for stage in ("val", "test"):
        for t in create_datamodule(cfg.data).tasks:
            assert math.isfinite(m[f"{stage}/loss/{t.name}"])
            for metric in t.metrics:  # every metric of every task is logged, and finite
                assert math.isfinite(m[t.key(stage, metric)])
    assert (Path(m["run_dir"]) / "checkpoints" / "last.ckpt").is_file()
