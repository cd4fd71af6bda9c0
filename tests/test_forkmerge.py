"""ForkMerge: exactness against plain training, the merge search, negative transfer, mid-round resume."""

import json
from pathlib import Path

import pytest
import torch

from experiments.run import run
from mtl_lightning.errors import MTLError
from mtl_lightning.forkmerge import greedy_search, grid_search
from mtl_lightning.weighting import WEIGHTINGS

BASE = [
    "data.train_size=640",
    "data.val_size=200",
    "data.test_size=200",
    "data.batch_size=64",
    "trainer.max_epochs=2",
    "test=false",
]  # 10 steps an epoch
FM = ["weighting.interval_steps=5", "weighting.val_batches=1"]


def final(m):
    return torch.load(f"{m['run_dir']}/checkpoints/last.ckpt", weights_only=False)


def model_params(ckpt):
    return {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("weighting.")}


@pytest.mark.parametrize(
    "grid, plain",
    [
        ("[0.0]", ["weighting=fixed", "weighting.weights=[1,0]"]),  # always the target-only branch
        ("[1.0]", ["weighting=fixed", "weighting.weights=[1,1]", "weighting.normalize=false"]),  # always joint
    ],
)
def test_reduced_grid_equals_plain_training(grid, plain, make_cfg, tmp_path):
    fm = run(make_cfg("digits_forkmerge", *BASE, *FM, f"weighting.grid={grid}", out_dir=tmp_path / "fm"))
    ref = run(make_cfg("digits_mtl", *BASE, *plain, out_dir=tmp_path / "ref"))
    a, b = model_params(final(fm)), model_params(final(ref))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert fm["val/acc/left"] == pytest.approx(ref["val/acc/left"])


def test_grid_search_finds_the_known_best():
    seen = []

    def score(lam):
        seen.append(lam)
        return -((lam[1] - 0.6) ** 2)

    assert grid_search(score, 2, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]) == pytest.approx([0.4, 0.6])
    assert len(seen) == 6


def test_greedy_search_follows_algorithm_3():
    # three branches; the score prefers weights near (0.5, 0.5, 0) and punishes any weight on branch 2
    target = torch.tensor([0.5, 0.5, 0.0])

    def score(lam):
        return -float(((torch.tensor(lam) - target) ** 2).sum()) - 10 * lam[2]

    lam = greedy_search(score, 3, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # own scores rank branch 0, 1 (tie: 0 first), 2; branch 1 is tried at a * 1 / 2 for a in the grid: a = 1 gives
    # (1, .5) -> (2/3, 1/3), the best reachable; every candidate weight on branch 2 scores worse: dropped
    assert lam == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert sum(lam) == pytest.approx(1.0)


def test_merges_are_logged_and_use_validation(make_cfg):
    m = run(make_cfg("digits_forkmerge", *BASE, *FM))
    hist = final(m)["callbacks"]["ForkMerge"]["history"]
    assert [h["step"] for h in hist] == [5, 10, 15, 20]
    for h in hist:
        lam = [h["forkmerge/lambda/0"], h["forkmerge/lambda/1"]]
        assert sum(lam) == pytest.approx(1.0) and min(lam) >= 0
        assert h["forkmerge/val/merged"] >= max(h["forkmerge/val/0"], h["forkmerge/val/1"]) - 1e-9  # grid has 0, 1
    header = (next((__import__("pathlib").Path(m["run_dir"]) / "csv").glob("*/metrics.csv"))).read_text().split("\n")[0]
    assert "forkmerge/lambda/1" in header and "forkmerge/val/merged" in header


@pytest.mark.parametrize("exp", ["digits_forkmerge", "digits_mdl"])
def test_mid_round_resume_matches_uninterrupted(exp, make_cfg, tmp_path):
    from test_train import Crash

    args = [*BASE, *FM, "weighting.interval_steps=6", "checkpoint.every_n_steps=4"]  # crash at 9: mid-round
    if exp == "digits_mdl":  # each branch samples its own batches
        args = [*MDL, *FM, "checkpoint.every_n_steps=4", "data.train_size=320"]
    full = run(make_cfg(exp, *args, out_dir=tmp_path / "a"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_cfg(exp, *args, out_dir=tmp_path / "b"), callbacks=[Crash(9)])
    resumed = run(make_cfg(exp, *args, "resume=last", out_dir=tmp_path / "b"))
    a, b = final(full), final(resumed)
    for k, v in model_params(a).items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-6), k
    fa, fb = a["callbacks"]["ForkMerge"], b["callbacks"]["ForkMerge"]
    assert [h["forkmerge/lambda/1"] for h in fa["history"]] == [h["forkmerge/lambda/1"] for h in fb["history"]]
    for br_a, br_b in zip(fa["branches"], fb["branches"]):
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(br_a, br_b))


@pytest.mark.parametrize(
    "override, message",
    [
        ("weighting.target=[]", "must name one or more distinct tasks"),
        ("weighting.target=[middle]", "must name one or more distinct tasks"),
        ("weighting.grid=[1.5]", "within \\[0, 1\\]"),
        ("weighting.branches=[[1,0]]", "at least two branches"),
        ("weighting.branches=[[1,0],[1]]", "has 1 values but there are 2 tasks"),
        ("weighting.search=best", "Valid choices: auto, grid, greedy"),
    ],
)
def test_bad_forkmerge_config(override, message, make_cfg):
    with pytest.raises(MTLError, match=message):
        run(make_cfg("digits_forkmerge", override))


def test_branches_of_algorithms_1_and_2():
    cls = WEIGHTINGS.get("forkmerge")
    two = cls(["t", "a", "b"], cls.Config(target=["t"], aux_weight=0.5))
    assert two.branch_weights.tolist() == [[1, 0, 0], [1, 0.25, 0.25]]
    per = cls(["t", "a", "b"], cls.Config(target=["t"], per_auxiliary=True))
    assert per.branch_weights.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert torch.allclose(two.branch_probs(), torch.tensor([[1, 0, 0], [1 / 1.5, 0.25 / 1.5, 0.25 / 1.5]]))


def test_each_branch_draws_whole_batches_from_its_own_probabilities():
    from mtl_lightning.data.base import BranchBatchSampler

    domains = torch.arange(3).repeat_interleave(50)
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    s = BranchBatchSampler(domains, probs, batch_size=8, num_batches=3000, seed=1)
    idx = s.batches(0)  # (steps, branches, batch)
    d = domains[idx]
    assert (d == d[..., :1]).all()  # one domain per branch batch
    for b in range(3):
        freq = torch.bincount(d[:, b, 0], minlength=3).float() / len(d)
        assert torch.allclose(freq, probs[b], atol=0.03)  # chosen with the branch's probabilities; p = 0 never
    assert not torch.equal(idx[:, 1], idx[:, 2])  # the branches draw independent streams
    s.resume(0, 5)
    assert list(s)[0] == idx[5].flatten().tolist() and torch.equal(s.batches(0), idx)  # resumable, deterministic
    s.set_epoch(1)
    assert not torch.equal(s.batches(1), idx)


MDL = [*BASE, "weighting=forkmerge", "weighting.target=[clean]", "weighting.interval_steps=6", "data.mixing=sample"]


class BranchDomains:
    """Record the domains in each branch's slice of every training batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        labels = batch[1].chunk(2)
        self.seen.append([sorted({int(c) for c in (lab >= 0).float().argmax(1)}) for lab in labels])


def test_mdl_branches_sample_their_own_domains(make_cfg):
    from lightning.pytorch.callbacks import Callback

    rec = type("Rec", (BranchDomains, Callback), {})()
    run(make_cfg("digits_mdl", *MDL, *FM), callbacks=[rec])
    assert len(rec.seen) == 2 * (1280 // 64)  # epochs x the split's size over one branch's batch size
    assert all(b0 == [0] for b0, _ in rec.seen)  # the target-only branch only ever sees the target domain
    assert all(len(b1) == 1 for _, b1 in rec.seen) and {b1[0] for _, b1 in rec.seen} == {0, 1}  # the joint: both


@pytest.mark.filterwarnings("error:The ``compute`` method:UserWarning")  # a metric computed from no sample
def test_a_merge_scored_on_one_batch_sees_its_target_domain(make_cfg):
    """digits_mdl's validation split is stored clean, then shifted: with one validation batch per candidate merge
    (weighting.val_batches=1, as the experiment configs' smoke tests run), a `shifted` target was scored on no sample
    (torchmetrics' 0 for every candidate: the first won). Each batch now holds each domain's share."""
    over = [o.replace("[clean]", "[shifted]") for o in MDL]
    m = run(make_cfg("digits_mdl", *over, *FM, "data.eval_batch_size=16", "trainer.max_epochs=1"))
    hist = final(m)["callbacks"]["ForkMerge"]["history"]
    scores = [h[f"forkmerge/val/{k}"] for h in hist for k in ("0", "1", "merged")]
    assert len(hist) == 4 and all(x * 8 == round(x * 8) for x in scores)  # accuracy on the batch's 8 shifted digits


def _target_acc(make_cfg, tmp_path, tag, *overrides):
    return run(make_cfg("synthetic_mtl", *overrides, out_dir=tmp_path / tag))["val/acc/task0"]


@pytest.mark.parametrize(
    "scenario, aux, extra",
    [
        ("harmful", 10, ["data.label_noise=[0,1.0]", "trainer.max_epochs=8"]),  # the auxiliary labels are noise
        ("helpful", 1, ["data.relatedness=1.0", "data.label_noise=[0.7,0]", "trainer.max_epochs=4"]),  # a clean copy
    ],
)
def test_negative_transfer_is_avoided(scenario, aux, extra, make_cfg, tmp_path):
    base = ["data.num_tasks=2", "data.train_size=1000", "optim.lr=3e-3", "test=false", *extra]
    alone = _target_acc(make_cfg, tmp_path, "alone", *base, "weighting=fixed", "weighting.weights=[1,0]")
    joint = _target_acc(
        make_cfg,
        tmp_path,
        "joint",
        *base,
        "weighting=fixed",
        f"weighting.weights=[1,{aux}]",
        "weighting.normalize=false",
    )
    fm = _target_acc(
        make_cfg,
        tmp_path,
        "fm",
        *base,
        "weighting=forkmerge",
        "weighting.target=[task0]",
        f"weighting.aux_weight={aux}",
        "weighting.interval_steps=8",
    )
    if scenario == "harmful":
        assert joint < alone - 0.05  # the setting does transfer negatively ...
        assert fm >= joint and abs(fm - alone) <= 0.03  # ... and ForkMerge keeps the target-only accuracy
    else:
        assert joint > alone + 0.02  # the auxiliary task helps ...
        assert fm >= alone  # ... and ForkMerge is at least target-only


def test_offloaded_branches_give_the_same_result(make_cfg, tmp_path):
    on = run(make_cfg("digits_forkmerge", *BASE, *FM, "weighting.offload=true", out_dir=tmp_path / "on"))
    off = run(make_cfg("digits_forkmerge", *BASE, *FM, out_dir=tmp_path / "off"))
    a, b = model_params(final(on)), model_params(final(off))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert all(t.device.type == "cpu" for br in final(on)["callbacks"]["ForkMerge"]["branches"] for t in br)


def test_merge_averages_batchnorm_statistics(make_cfg, monkeypatch):
    """Each branch keeps its own BatchNorm running statistics, and the merge averages them with the same Λ as the
    parameters (the reference merges the whole state dict)."""
    from mtl_lightning.forkmerge import ForkMerge

    seen = []
    original = ForkMerge.merge

    def spy(self, module):
        seen.append([[t.clone() for t in br] for br in self.branches])  # the branches just before the merge
        original(self, module)
        names = [n for n, _ in module.named_parameters()] + [
            n for n, b in module.named_buffers() if b.is_floating_point() and n.startswith(("backbone.", "heads."))
        ]
        seen[-1].append(dict(zip(names, [t.clone() for t in self.merged])))

    monkeypatch.setattr(ForkMerge, "merge", spy)
    resnet = ["model.backbone=resnet18", "model.depth=null", "model.width=null", "model.num_heads=null"]
    resnet.append("model.patch_size=null")
    m = run(make_cfg("digits_forkmerge", *BASE, "trainer.max_epochs=1", "weighting.grid=[0.5]", *resnet))
    b0, b1, merged = seen[-1]
    names = list(merged)
    stats = [i for i, n in enumerate(names) if n.endswith("running_mean")]
    assert stats and any(not torch.allclose(b0[i], b1[i]) for i in stats)  # the branches' statistics differ
    for i, n in enumerate(names):
        assert torch.allclose(merged[n], 0.5 * b0[i] + 0.5 * b1[i], atol=1e-6), n
    ckpt = final(m)["state_dict"]
    assert torch.allclose(ckpt[names[stats[0]]], merged[names[stats[0]]].cpu())  # the model holds the merge


def test_topk_branches_have_the_reference_weights():
    cls = WEIGHTINGS.get("forkmerge")
    tasks = ["t", "a", "b", "c"]
    w = cls(tasks, cls.Config(target=["t"], topk=[0, 1, 3], pruning_epochs=2))
    w.use_ranking([3, 1, 2])  # c ranked best, then a, then b
    # branch k: the target (weight 1) + the k best auxiliaries sharing aux_weight = 1 (1/k each, as on DomainNet)
    want = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 1], [1, 1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(w.branch_weights, want)
    equal = cls(tasks, cls.Config(target=["t"], topk=[0, 2], pruning_epochs=2, aux_split=False))
    equal.use_ranking([2, 1, 3])
    assert equal.branch_weights.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]  # NYUv2: equal loss weights
    with pytest.raises(MTLError, match="set weighting.pruning_epochs"):
        cls(tasks, cls.Config(target=["t"], topk=[0, 1]))
    with pytest.raises(MTLError, match=r"weighting.topk=\[0, 4\] must be distinct counts"):
        cls(tasks, cls.Config(target=["t"], topk=[0, 4], pruning_epochs=1))


def test_pruning_ranks_a_helpful_auxiliary_above_a_noise_auxiliary(make_cfg):
    over = ["data.num_tasks=3", "data.label_noise=[0,0,1.0]", "data.relatedness=0.9", "data.train_size=1000"]
    over += ["weighting=forkmerge", "weighting.target=[task0]", "weighting.topk=[0,1]", "weighting.pruning_epochs=3"]
    over.append("weighting.aux_weight=3")  # a strong auxiliary, so the noise one hurts clearly (4 of 4 seeds tried)
    m = run(make_cfg("synthetic_mtl", *over, "trainer.max_epochs=1", "test=false"))
    pruned = json.loads((Path(m["run_dir"]) / "pruning.json").read_text())
    assert pruned["ranking"] == ["task1", "task2"] and pruned["scores"]["task1"] > pruned["scores"]["task2"]
    weights = final(m)["state_dict"]["weighting.branch_weights"]
    assert weights.tolist() == [[1, 0, 0], [1, 3, 0]]  # the top-1 branch took the clean auxiliary
    assert sorted(p.name for p in (Path(m["run_dir"]) / "pruning" / "synthetic_mtl").iterdir()) == ["task1", "task2"]


def test_merge_takes_each_branch_best_weights_of_the_round(make_cfg, monkeypatch):
    """Best of round, as the reference: scored at the epoch end inside a round, branch 0 was best then and branch 1
    at the round's end; the merge combines branch 0's earlier weights with branch 1's last ones."""
    import mtl_lightning.forkmerge as fm

    scores = iter([0.9, 0.1, 0.5, 0.6])  # track: b0, b1 (epoch 1); merge: b0, b1 at the round's end (epoch 2)
    monkeypatch.setattr(fm, "merge_score", lambda *a: next(scores, 0.0))
    snaps = {}
    track, merge = fm.ForkMerge.track, fm.ForkMerge.merge

    def spy_track(self, module):
        snaps["epoch1"] = [[t.clone() for t in br] for br in self.branches]
        track(self, module)

    def spy_merge(self, module):
        snaps["end"] = [[t.clone() for t in br] for br in self.branches]
        merge(self, module)
        snaps["merged"] = [t.clone() for t in self.merged]

    monkeypatch.setattr(fm.ForkMerge, "track", spy_track)
    monkeypatch.setattr(fm.ForkMerge, "merge", spy_merge)
    run(make_cfg("digits_forkmerge", *BASE, "weighting.interval_epochs=2", "weighting.grid=[0.5]"))
    b0, b1 = snaps["epoch1"][0], snaps["end"][1]
    assert not all(torch.equal(a, b) for a, b in zip(snaps["epoch1"][0], snaps["end"][0]))  # branch 0 moved on
    for m, x, y in zip(snaps["merged"], b0, b1):
        assert torch.allclose(m, 0.5 * x + 0.5 * y, atol=1e-6)


def test_fp16_branches_step_through_the_scaler_and_match_fp32(make_cfg, tmp_path):
    """Every branch's step goes through the GradScaler; on the CPU fp16 runs with a scaler as on a GPU
    (train.fp16_cpu). SGD, unlike Adam, is not scale-invariant: a branch stepped on still-scaled gradients diverges."""
    # a one-block ViT (fp16 on a CPU is slow: 46 s at the config's 3 x 64, 12 s so): a branch stepped on scaled
    # gradients still diverges at its first step
    args = [*BASE, *FM, "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "model.depth=1", "model.width=32"]
    fp32 = run(make_cfg("digits_forkmerge", *args, out_dir=tmp_path / "a"))
    fp16 = run(make_cfg("digits_forkmerge", *args, "trainer.precision=16-mixed", out_dir=tmp_path / "b"))
    target = next(k for k in fp32 if k.startswith("val/loss/"))
    assert abs(fp16[target] - fp32[target]) < 0.05, (fp16[target], fp32[target])
    params = model_params(final(fp16))
    assert all(torch.isfinite(v.float()).all() for v in params.values())
