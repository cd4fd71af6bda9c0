"""A backbone trained in part (issue 39): frozen whole (linear probing) or with PEFT's LoRA adapters. The frozen
weights do not move, the adapters have the parameters their formula gives, a run resumes exactly and evaluates to
its metrics, and a LoRA model starts from a plain run's weights (`model.init`)."""

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_train import CHANCE, LEARN, Crash, learn_and_resume

from experiments.evaluate import main as evaluate_main
from experiments.run import run
from mtl_lightning.adapters import lora_layers
from mtl_lightning.checkpoint import init_checkpoint as init_ckpt
from mtl_lightning.errors import MTLError
from mtl_lightning.train import build
from mtl_lightning.weighting import WEIGHTINGS

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


def test_a_linear_probe_of_a_batchnorm_backbone_keeps_its_statistics(make_cfg):
    """Linear probing freezes the backbone's buffers too: a ResNet's BatchNorm statistics do not follow the new data."""
    seen = Before()
    over = ["model.backbone=test_resnet", *(f"model.{k}=null" for k in ("depth", "width", "num_heads", "patch_size"))]
    run(make_cfg("digits_mtl", *TINY[:5], *over, "model.freeze_backbone=true", "weighting=dwa"), callbacks=[seen])
    stats = [k for k in seen.start if "running_mean" in k]
    assert stats and all(torch.equal(seen.start[k], seen.end[k]) for k in seen.start)


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


SHARES = {"task": 0, "both": 1, "mtlora": 1}  # per-task adapter layouts -> whether shared adapters exist
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # model.lora.targets' default


@pytest.mark.parametrize("share", list(SHARES))
def test_per_task_adapters_get_no_gradient_from_the_other_tasks_losses(make_cfg, share):
    """Task k's loss reaches its own adapters (and the shared ones), never another task's: a pass per task, each
    through its own adapters."""
    b = build(make_cfg("digits_mtl", *TINY, "model.adapter=lora", f"model.lora.share={share}"))
    x = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (8, 2))
    losses, _, _ = b.model.batch_losses(x, y)
    torch.manual_seed(0)  # B starts at zero, so no gradient would reach A: give every B a value first
    for n, p in b.model.backbone.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    losses, _, _ = b.model.batch_losses(x, y)
    losses[1].backward()  # the right task's loss alone
    grads = {n: p.grad for n, p in b.model.backbone.named_parameters() if p.requires_grad}
    reached = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert {n for n in grads if ".task1." in n} <= reached  # its own adapters, every one of them
    assert not {n for n in reached if ".task0." in n}  # the other task's: none
    assert bool({n for n in reached if ".default." in n}) == bool(SHARES[share])  # the shared ones, where they are
    assert not {n for n in reached if "lora_" not in n}


def test_mtlora_runs_the_shared_blocks_once_per_batch_with_the_same_outputs_and_gradients(make_cfg):
    """MTLoRA's blocks below the per-task ones compute the same for every task: they run in the first task's pass only,
    and the tasks' losses and every adapter's gradient equal those of a full pass per task."""
    b = build(make_cfg("digits_mtl", *TINY, "model.depth=3", "model.adapter=lora", "model.lora.share=mtlora"))
    backbone = b.model.backbone
    torch.manual_seed(0)
    for n, p in backbone.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    x = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (8, 2))
    calls = {i: 0 for i in range(3)}
    for i in calls:
        backbone.blocks[i].register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))

    def losses_and_grads():
        b.model.zero_grad()
        losses = b.model.batch_losses(x, y)[0]
        losses.sum().backward()
        return losses.detach(), {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}

    once, grads = losses_and_grads()
    assert calls == {0: 1, 1: 1, 2: 2}  # blocks 0 and 1 shared (once), block 2 per task (twice)
    assert backbone.shared_prefix[1] == 2 and all(type(backbone.blocks[i]).__name__ == "Block" for i in calls)
    backbone.shared_prefix = None  # a full pass per task
    full, full_grads = losses_and_grads()
    assert calls == {0: 3, 1: 3, 2: 4}  # then twice more each
    assert torch.allclose(once, full, atol=1e-6) and grads.keys() == full_grads.keys()
    # the same sums in another order (the shared blocks' gradient: one sum of both tasks' against two added)
    bad = [n for n in grads if not torch.allclose(grads[n], full_grads[n], rtol=1e-4, atol=1e-5)]
    assert not bad, bad


@pytest.mark.parametrize("share", ["shared", *SHARES])
def test_per_task_adapters_have_the_parameters_their_formula_gives(make_cfg, share):
    """r (in + out) per adapter: one per targeted layer (shared), K (task), K + 1 (both); mtlora: one in the first
    blocks' layers and K in the last block's. The shared ones are what the gradient methods combine."""
    rank, K = 2, 2
    over = ["model.adapter=lora", f"model.lora.rank={rank}", f"model.lora.share={share}", "model.depth=3"]
    b = build(make_cfg("digits_mtl", *TINY, *over))
    plain = build(make_cfg("digits_mtl", *TINY, "model.depth=3")).model.backbone
    layers = dict(plain.named_modules())
    per = {n: rank * (layers[n].in_features + layers[n].out_features) for n in lora_layers(plain, TARGETS)}
    below = sum(v for n, v in per.items() if not n.startswith("blocks.2."))  # mtlora's shared part
    shared, own = {
        "shared": (sum(per.values()), 0),
        "task": (0, K * sum(per.values())),
        "both": (sum(per.values()), K * sum(per.values())),
        "mtlora": (below, K * (sum(per.values()) - below)),
    }[share]
    assert sum(p.numel() for p in b.model.backbone.parameters() if p.requires_grad) == shared + own
    assert sum(p.numel() for p in b.model.shared_parameters()) == shared
    assert sum(p.numel() for p in b.model.task_adapters()) == own


def test_a_population_of_adapter_sets_equals_its_members_alone_and_holds_one_trunk(make_cfg, tmp_path):
    """Members that differ in their adapters and heads only: the frozen trunk from one file is held once (not in the
    checkpoint: model.checkpoint rebuilds it), and each member equals its standalone run."""
    trunk = tmp_path / "trunk.pth"
    torch.save(build(make_cfg("digits_mtl", *TINY, "seed=7")).model.backbone.state_dict(), trunk)
    over = [*TINY, f"model.checkpoint={trunk}", "model.adapter=lora", "model.lora.share=mtlora", "test=false"]
    W = [[0.5, 0.5], [0.9, 0.1]]
    pop = run(make_cfg("digits_mtl", *over, "population.weights=[[0.5,0.5],[0.9,0.1]]", out_dir=tmp_path / "p"))
    stacked = torch.load(f"{pop['run_dir']}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert stacked and all("lora_" in k or "heads__" in k for k in stacked if k.startswith("stacked.backbone"))
    assert not any("base_layer" in k for k in stacked)  # the trunk is not in it, stacked or not
    for i, (a, b) in enumerate(W):
        one = run(make_cfg("digits_mtl", *over, "weighting=fixed", f"weighting.weights=[{a},{b}]", out_dir=tmp_path))
        mine = torch.load(f"{one['run_dir']}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
        for k, v in mine.items():
            if "lora_" in k or k.startswith("heads."):
                assert torch.allclose(stacked[f"stacked.{k.replace('.', '__')}"][i], v, atol=2e-4), (i, k)
        assert pop[f"val/acc_mean/m{i}"] == pytest.approx(one["val/acc_mean"], abs=1e-4)


def test_an_mtlora_run_under_a_gradient_method_learns_resumes_exactly_and_evaluates(make_cfg, tmp_path):
    """PCGrad combines the shared adapters' gradients; each task's own adapters and head train on its own loss."""
    over = ["model.adapter=lora", "model.lora.share=mtlora", "model.depth=2", "optim.lr=1e-2", "weighting=pcgrad"]
    full, a, b = learn_and_resume(make_cfg, tmp_path, *over, "weighting.mode=param")
    assert full["val/acc/left"] > CHANCE + 0.1 and full["val/acc/right"] > CHANCE + 0.1
    assert any(".task1." in k for k in a) and any(".default." in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    out = tmp_path / "eval.json"
    assert evaluate_main([full["run_dir"], "--out", str(out)]) == 0
    assert json.loads(out.read_text())["test/acc_mean"] == pytest.approx(full["test/acc_mean"], abs=1e-6)


@pytest.mark.parametrize(
    "over, message",
    [
        (["model.lora.share=tasks"], r"Unknown model.lora.share='tasks'. Valid choices: shared, task, both, mtlora"),
        (["model.lora.share=mtlora", "model.lora.task_blocks=2"], r"needs 1 <= task_blocks < the 2 blocks"),
        (["model.lora.share=task", "weighting=pcgrad"], "trains none .*model.lora.share=task"),
        (["model.lora.share=both", "weighting=pcgrad", "weighting.mode=rep"], "mode=rep .* per-task adapters"),
        (["model.lora.share=both", "weighting=bayesagg_mtl"], "bayesagg_mtl computes the whole step's gradient"),
    ],
    ids=["unknown", "blocks", "no-shared", "rep", "step-loss"],
)
def test_what_per_task_adapters_cannot_run_is_one_paragraph(make_cfg, over, message):
    cfg = make_cfg("digits_mtl", *TINY, "model.adapter=lora", *over, "trainer.max_steps=1")
    with pytest.raises(MTLError, match=message):
        run(cfg)


def test_a_checkpoint_holds_what_trains_and_the_trunk_file_rebuilds_the_rest(make_cfg, tmp_path, capsys):
    """With the frozen trunk from a file (model.checkpoint), last.ckpt holds the adapters and heads, not the trunk; a
    resume continues exactly and `evaluate` gives the run's metrics from it; a changed file is refused."""
    trunk = tmp_path / "trunk.pth"
    torch.save(build(make_cfg("digits_mtl", *TINY, "seed=7")).model.backbone.state_dict(), trunk)
    over = [*TINY, f"model.checkpoint={trunk}", "model.adapter=lora", "checkpoint.every_n_steps=2"]
    full = run(make_cfg("digits_mtl", *over, out_dir=tmp_path / "a"))
    saved = torch.load(Path(full["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    assert not [k for k in saved["state_dict"] if ".base_layer." in k or k.endswith("patch_embed.proj.weight")]
    assert [k for k in saved["state_dict"] if "lora_" in k] and saved["frozen_trunk"]["source"].endswith("trunk.pth")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_cfg("digits_mtl", *over, out_dir=tmp_path / "b"), callbacks=[Crash(3)])
    resumed = run(make_cfg("digits_mtl", *over, "resume=last", out_dir=tmp_path / "b"))
    assert resumed["val/acc_mean"] == pytest.approx(full["val/acc_mean"], abs=1e-6)
    out = tmp_path / "eval.json"
    assert evaluate_main([full["run_dir"], "--out", str(out)]) == 0
    assert json.loads(out.read_text())["test/acc_mean"] == pytest.approx(full["test/acc_mean"], abs=1e-6)
    torch.save(build(make_cfg("digits_mtl", *TINY, "seed=8")).model.backbone.state_dict(), trunk)  # another trunk
    assert evaluate_main([full["run_dir"], "--out", str(out)]) == 2
    assert "its frozen backbone came from model.checkpoint=" in capsys.readouterr().err


def test_folding_lora_keeps_the_function_and_merging_adds_the_adapters_task_vectors(make_cfg, tmp_path):
    """Task vectors of adapters are differences of folded weights (B A is bilinear: A and B are not added entry by
    entry): a LoRA model and the plain model of its folded state compute the same; a merging run of LoRA task
    models from a plain trunk merges s (B_t A_t) into that trunk."""
    from mtl_lightning.adapters import fold_lora

    over = [*TINY, "model.adapter=lora", "model.lora.rank=4", "model.lora.alpha=8"]
    lora = build(make_cfg("digits_mtl", *over)).model
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # B starts at zero: a fold of it would be the identity
    plain = build(make_cfg("digits_mtl", *TINY)).model
    plain.load_state_dict(fold_lora(lora.state_dict(), 8 / 4))
    x = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(lora.eval()(x)[0], plain.eval()(x)[0], atol=1e-5)

    trunk = run(make_cfg("digits_mtl", *TINY, out_dir=tmp_path / "trunk"))["run_dir"]
    merge = ["merging=task_arithmetic", "merging.warmup_epochs=0", "merging.lambdas=[0.5]", f"model.init={trunk}"]
    m = run(make_cfg("digits_mtl", *over, *merge, "run_name=merged", out_dir=tmp_path / "m"))
    record = json.loads((Path(m["run_dir"]) / "merging.json").read_text())
    load = lambda p: torch.load(init_ckpt(p), weights_only=False)["state_dict"]  # noqa: E731
    start, left, right = (fold_lora(load(p), 2.0) for p in (record["start"], *record["models"].values()))
    merged = torch.load(Path(m["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in merged if "lora_" in k or "base_layer" in k]  # a plain model
    k = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(left[k], start[k])  # the adapters moved the folded weights
    assert torch.allclose(merged[k], start[k] + 0.5 * (left[k] + right[k] - 2 * start[k]), atol=1e-5)
    out = tmp_path / "eval.json"
    assert evaluate_main([m["run_dir"], "--out", str(out)]) == 0
    assert json.loads(out.read_text())["test/acc_mean"] == pytest.approx(m["test/acc_mean"], abs=1e-6)


def test_forkmerge_branches_of_adapters_hold_the_adapters_and_heads_only(make_cfg, tmp_path):
    """ForkMerge's branches own what trains: with LoRA, each branch is a set of adapters and heads (the frozen trunk
    is one, untouched), so forking costs adapters, not backbones."""
    seen = Before()
    over = [*TINY, "model.adapter=lora", "weighting.grid=[0.5]", "weighting.interval_steps=2", "trainer.max_steps=4"]
    m = run(make_cfg("digits_forkmerge", *over), callbacks=[seen])
    moved = {k for k in seen.start if not torch.equal(seen.start[k], seen.end[k])}
    assert moved and all("lora_" in k for k in moved)
    saved = torch.load(Path(m["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    branches = next(v["branches"] for v in saved["callbacks"].values() if "branches" in v)
    trainable = build(make_cfg("digits_forkmerge", *over)).model
    assert len(branches) == 2 and all(
        sum(t.numel() for t in br) == sum(p.numel() for p in trainable.parameters() if p.requires_grad)
        for br in branches
    )
    assert math.isfinite(m["val/acc_mean"])


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_trains_mtlora_adapters_or_says_why_not(make_cfg, name):
    """Every registered weighting on MTLoRA's layout (shared adapters below, per-task ones in the last block): it
    trains the shared and every task's own adapters and leaves the trunk as it was, or refuses in one paragraph."""
    from test_train import method_args

    cls = WEIGHTINGS.get(name)
    over = [*TINY, "model.adapter=lora", "model.lora.share=mtlora", "trainer.max_steps=2", "test=false"]
    over += [a.replace("=left", "=[left]") if name == "forkmerge" else a for a in method_args(name)]
    over += ["weighting.mode=param"] if getattr(cls, "gradient_based", False) else []
    over += {"forkmerge": ["weighting.target=[left]", "weighting.interval_steps=1", "weighting.val_batches=1"]}.get(
        name, []
    )
    if name == "fixed":
        over.append("weighting.weights=[1,1]")
    cfg = make_cfg("digits_mtl", *over)
    if hasattr(cls, "step_loss"):  # FORUM, BayesAgg-MTL: their whole step is on shared parts
        with pytest.raises(MTLError, match="per-task adapters"):
            run(cfg)
        return
    seen = Before()
    run(cfg, callbacks=[seen])
    moved = {k for k in seen.start if not torch.equal(seen.start[k], seen.end[k])}
    assert all("lora_" in k for k in moved)
    assert any(".default." in k for k in moved)  # the shared adapters
    for k in ("task0", "task1"):  # each task's own (an auxiliary method may silence its auxiliary: then one)
        assert any(f".{k}." in k2 for k2 in moved) or (cls.auxiliary and k == "task1"), k
