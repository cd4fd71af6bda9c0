"""ForkMerge: exactness against plain training, the merge search, negative transfer, mid-round resume."""

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


def test_mid_round_resume_matches_uninterrupted(make_cfg, tmp_path):
    from test_train import Crash

    args = [*BASE, *FM, "weighting.interval_steps=6", "checkpoint.every_n_steps=4"]  # crash at 9: mid-round
    full = run(make_cfg("digits_forkmerge", *args, out_dir=tmp_path / "a"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_cfg("digits_forkmerge", *args, out_dir=tmp_path / "b"), callbacks=[Crash(9)])
    resumed = run(make_cfg("digits_forkmerge", *args, "resume=last", out_dir=tmp_path / "b"))
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
    with pytest.raises(MTLError, match="data.mixing=sample"):
        two.mixture_probs()


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
