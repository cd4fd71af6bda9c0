"""A backbone trained in part (issue 39): frozen whole (linear probing) or with PEFT's LoRA adapters. The frozen
weights do not move, the adapters have the parameters their formula gives, a run resumes exactly and evaluates to
its metrics, and a LoRA model starts from a plain run's weights (`model.init`)."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_train import CHANCE, LEARN, learn_and_resume

from experiments.evaluate import main as evaluate_main
from experiments.run import run
from mtl_lightning.adapters import lora_layers
from mtl_lightning.errors import MTLError
from mtl_lightning.train import build

pytest.importorskip("peft")
TINY = ["data.train_size=256", "data.batch_size=64", "data.val_size=64", "data.test_size=64", "trainer.max_epochs=1"]
TINY += ["model.width=32", "model.depth=2"]


class Before(Callback):
    """The backbone's state when training starts and when it ends."""

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}
        self.trainable = {n for n, p in pl_module.backbone.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        self.end = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}


@pytest.mark.parametrize("extra", [["model.adapter=lora"], ["model.freeze_backbone=true"]], ids=["lora", "probe"])
def test_frozen_weights_do_not_move_and_only_the_adapters_train(make_cfg, extra):
    seen = Before()
    method = "weighting=pcgrad" if "model.adapter=lora" in extra else "weighting=dwa"  # gradient methods need LoRA
    run(make_cfg("digits_mtl", *TINY, *extra, method), callbacks=[seen])
    moved = {k for k in seen.start if not torch.equal(seen.start[k], seen.end[k])}
    if extra == ["model.freeze_backbone=true"]:
        assert not seen.trainable and not moved  # linear probing: the backbone is untouched, bit for bit
        return
    assert seen.trainable and all("lora_" in n for n in seen.trainable)
    # every frozen entry bit for bit (lora_A moves at once; lora_B, zero at first, too after a step)
    assert moved and all("lora_" in k for k in moved)
    assert {k for k in moved if "lora_A" in k} and {k for k in moved if "lora_B" in k}


@pytest.mark.parametrize("rank", [1, 4])
def test_a_lora_backbone_has_the_parameters_its_formula_gives(make_cfg, rank):
    cfg = make_cfg("digits_mtl", *TINY, "model.adapter=lora", f"model.lora.rank={rank}")
    b = build(cfg)
    plain = build(make_cfg("digits_mtl", *TINY)).model.backbone
    layers = dict(plain.named_modules())
    names = lora_layers(plain, cfg.model.lora.targets)
    assert len(names) == 4 * 2  # qkv, proj, fc1, fc2 in each of the 2 blocks
    want = sum(rank * (layers[n].in_features + layers[n].out_features) for n in names)
    trainable = [p for p in b.model.backbone.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == want
    assert sum(p.numel() for p in b.model.shared_parameters()) == want  # what the gradient methods differentiate
    frozen = sum(p.numel() for p in b.model.backbone.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for p in plain.parameters())  # the whole original backbone, frozen


def test_a_lora_run_learns_resumes_exactly_and_evaluates_to_its_metrics(make_cfg, tmp_path):
    full, a, b = learn_and_resume(make_cfg, tmp_path, "model.adapter=lora", "model.lora.rank=8", "optim.lr=1e-2")
    assert full["val/acc/left"] > CHANCE + 0.1 and full["val/acc/right"] > CHANCE + 0.1  # adapters alone learn
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    out = tmp_path / "eval.json"
    assert evaluate_main([full["run_dir"], "--out", str(out)]) == 0  # the adapters are rebuilt from the config
    assert json.loads(out.read_text())["test/acc_mean"] == pytest.approx(full["test/acc_mean"], abs=1e-6)
    assert LEARN  # the learning budget test_train's methods use


def test_a_lora_model_starts_from_a_plain_runs_weights(make_cfg, tmp_path):
    """The plain run's trunk is the "pretrained" backbone: model.init maps each adapted layer's weights to its
    base_layer, and the adapters start at zero, so the LoRA model begins as the plain model's function."""
    plain = run(make_cfg("digits_mtl", *TINY, out_dir=tmp_path / "a"))
    ckpt = torch.load(Path(plain["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = build(make_cfg("digits_mtl", *TINY, "model.adapter=lora", f"model.init={plain['run_dir']}"))
    from mtl_lightning.checkpoint import init_weights

    init_weights(b.model, plain["run_dir"])
    mine = b.model.state_dict()
    k = "backbone.blocks.0.attn.qkv"
    assert torch.equal(mine[f"{k}.base_layer.weight"], ckpt[f"{k}.weight"])
    x = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8)
    ref = build(make_cfg("digits_mtl", *TINY))
    ref.model.load_state_dict(ckpt)
    with torch.no_grad():
        assert torch.allclose(b.model.eval()(x)[0], ref.model.eval()(x)[0], atol=1e-5)


def test_bad_lora_settings_are_one_paragraph(make_cfg):
    with pytest.raises(MTLError, match=r"model.lora.targets=\['nope'\] name no linear.*qkv"):
        build(make_cfg("digits_mtl", *TINY, "model.adapter=lora", "model.lora.targets=[nope]"))
    with pytest.raises(MTLError, match="Unknown model.adapter='lorra'"):
        build(make_cfg("digits_mtl", *TINY, "model.adapter=lorra"))
    with pytest.raises(MTLError, match="rank=0 must be >= 1"):
        build(make_cfg("digits_mtl", *TINY, "model.adapter=lora", "model.lora.rank=0"))
    with pytest.raises(MTLError, match="weighting=pcgrad combines the tasks' gradients on the shared parameters"):
        build(make_cfg("digits_mtl", *TINY, "model.freeze_backbone=true", "weighting=pcgrad"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_load_from_a_file_on_disk(make_cfg, tmp_path, suffix):
    """model.checkpoint: the pretrained weights offline, through timm's loading (its classifier dropped)."""
    source = build(make_cfg("digits_mtl", *TINY, "seed=1")).model.backbone.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    else:
        torch.save(source, path)
    loaded = build(make_cfg("digits_mtl", *TINY, f"model.checkpoint={path}")).model.backbone.state_dict()
    assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)
    lora = build(make_cfg("digits_mtl", *TINY, f"model.checkpoint={path}", "model.adapter=lora")).model.backbone
    k = "blocks.0.attn.qkv"
    assert torch.equal(lora.state_dict()[f"{k}.base_layer.weight"], source[f"{k}.weight"])  # adapters on top
    with pytest.raises(MTLError, match="is not a file"):
        build(make_cfg("digits_mtl", *TINY, f"model.checkpoint={tmp_path / 'none.pth'}"))
