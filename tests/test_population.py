"""Populations: members equal standalone runs, are independent, exploit copies state exactly, MDL members sample
with their own p, resume is exact, members export as ordinary models, and what cannot be vectorised is refused."""

import csv
import json
import warnings

import pytest
import torch
from test_train import Crash

from experiments.run import run
from mtl_lightning.checkpoint import load_model
from mtl_lightning.data import create_datamodule
from mtl_lightning.data.base import PopulationBatchSampler
from mtl_lightning.errors import MTLError
from mtl_lightning.population import copy_member, export_member

TINY = ["data.train_size=600", "data.val_size=200", "data.test_size=200", "trainer.max_epochs=2", "test=false"]
W = [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]


def weights_arg(rows) -> str:
    return "population.weights=[" + ",".join(f"[{a},{b}]" for a, b in rows) + "]"


def state(m):
    return torch.load(f"{m['run_dir']}/checkpoints/last.ckpt", weights_only=False)["state_dict"]


def test_members_equal_standalone_runs_are_independent_and_export(make_cfg, tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pop = run(make_cfg("digits_mtl", *TINY, weights_arg(W), out_dir=tmp_path / "pop"))
    # on CPU the ViT's attention is not the fused kernel, which vmap would run member by member, warning every step
    assert not [w for w in seen if "batching rule" in str(w.message)]
    stacked = state(pop)
    for i, (a, b) in enumerate(W):  # member i is the standalone weighting=fixed run of the same seed
        one = run(make_cfg("digits_mtl", *TINY, "weighting=fixed", f"weighting.weights=[{a},{b}]", out_dir=tmp_path))
        for k, v in state(one).items():
            if k.startswith(("backbone.", "heads.")):
                assert torch.allclose(stacked[f"stacked.{k.replace('.', '__')}"][i], v, atol=2e-4), (i, k)
        for key in ("val/loss/left", "val/loss/right", "val/acc/left", "val/acc_mean"):
            assert pop[f"{key}/m{i}"] == pytest.approx(one[key], abs=1e-4), (i, key)
    # changing member 2's weights changes nothing in members 0 and 1
    other = state(run(make_cfg("digits_mtl", *TINY, weights_arg([*W[:2], [1.0, 0.0]]), out_dir=tmp_path / "b")))
    keys = [k for k in stacked if k.startswith("stacked.")]
    assert all(torch.equal(stacked[k][:2], other[k][:2]) for k in keys)
    assert not all(torch.equal(stacked[k][2], other[k][2]) for k in keys)
    # any member is an ordinary single model: exported, loaded as a MultiTaskModule, evaluated to the same numbers
    path = export_member(f"{pop['run_dir']}/checkpoints/last.ckpt", 1, tmp_path / "m1.ckpt")
    model = load_model(path)
    assert model.weighting.w.tolist() == pytest.approx([0.9, 0.1])
    dm = create_datamodule(make_cfg("digits_mtl", *TINY).data, 0)
    dm.setup()
    got = model.evaluate(dm.val_dataloader(), [0, 1])
    assert got["acc/left"] == pytest.approx(pop["val/acc/left/m1"], abs=1e-6)
    assert got["acc/right"] == pytest.approx(pop["val/acc/right/m1"], abs=1e-6)
    with pytest.raises(MTLError, match="member 3 does not exist: the population has members 0..2"):
        export_member(f"{pop['run_dir']}/checkpoints/last.ckpt", 3, tmp_path / "m3.ckpt")


def test_exploit_copies_parameters_and_optimiser_state(make_cfg):
    from mtl_lightning.population import PopulationModule, plan_population

    cfg = make_cfg("digits_mtl", "data.train_size=64", weights_arg(W), "model.depth=1", "model.width=16")
    dm = create_datamodule(cfg.data, 0)
    dm.setup()
    Wt, seeds = plan_population(cfg, ["left", "right"])
    module = PopulationModule(dm.tasks, dm.in_chans, dm.img_size, cfg.model, cfg.optim, Wt, [0, 1, 2])
    module.setup("fit")
    opt = torch.optim.AdamW(module.param_groups(), lr=1e-2)
    x, y = dm.splits["train"].__getitems__(list(range(32)))

    def step():
        opt.zero_grad()
        losses, _ = module._vmap(slice(None), x, module.targets(y))
        (module.member_weights * losses).sum().backward()
        opt.step()

    step()
    step()
    params = list(module.stacked.values())
    assert not torch.equal(params[0][0], params[0][1])  # different seeds, different weights
    copy_member(module, opt, src=0, dst=1)
    module.member_weights[1] = module.member_weights[0]
    for p in params:
        assert torch.equal(p[0], p[1]) and torch.equal(opt.state[p]["exp_avg_sq"][0], opt.state[p]["exp_avg_sq"][1])
    step()  # identical weights, parameters and moments: identical next steps
    for p in params:
        assert torch.equal(p[0], p[1])
        assert not torch.equal(p[0], p[2])


def test_mdl_members_draw_batches_with_their_own_probabilities():
    domains = torch.tensor([0] * 300 + [1] * 100)
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    sampler = PopulationBatchSampler(domains, probs, batch_size=64, num_batches=50, seed=3)
    batches = sampler.batches(epoch=0)  # (steps, members, batch)
    share = (domains[batches] == 1).float().mean((0, 2))
    assert share[0] == 0 and abs(share[1] - 0.5) < 0.03 and abs(share[2] - 0.8) < 0.03
    # pools are shared: where two members draw the same domain at a step, they take the same first samples
    step = batches[0]
    d1 = [row[domains[row] == 1] for row in step]
    n = min(len(d1[1]), len(d1[2]))
    assert torch.equal(d1[1][:n], d1[2][:n])
    sampler.resume(0, 7)
    assert list(sampler) == batches[7:].flatten(1).tolist()  # a mid-epoch resume skips what was trained
    assert not torch.equal(batches, sampler.batches(epoch=1))


def test_mdl_population_learns_per_member_and_resumes_mid_epoch_exactly(make_cfg, tmp_path):
    args = ["data.train_size=1200", "data.val_size=200", "data.test_size=200", "data.batch_size=64", "test=false"]
    args += ["trainer.max_epochs=3", "checkpoint.every_n_steps=5", "data.mixing=sample", weights_arg([[1, 0], [0, 1]])]
    full = run(make_cfg("digits_mdl", *args, out_dir=tmp_path / "a"))
    # each member trained on its own domain only: it knows that domain, not the other
    assert full["val/acc/clean/m0"] > 0.3 and full["val/acc/shifted/m0"] < 0.2
    assert full["val/acc/shifted/m1"] > 0.3 and full["val/acc/clean/m1"] < 0.2
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_cfg("digits_mdl", *args, out_dir=tmp_path / "b"), callbacks=[Crash(27)])
    resumed = run(make_cfg("digits_mdl", *args, "resume=last", out_dir=tmp_path / "b"))
    a, b = state(full), state(resumed)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed["val/acc/clean/m0"] == pytest.approx(full["val/acc/clean/m0"], abs=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["weighting=pcgrad"], "weighting=pcgrad learns or combines weights per step.*search.backend=ray"),
        (
            ["model.backbone=resnet18", *(f"model.{k}=null" for k in ("depth", "width", "num_heads", "patch_size"))],
            "BatchNorm2d layers.*search.backend=ray",
        ),
        (["population.weights=[[1,0,0]]"], r"population.weights\[0\] has 3 values but there are 2 tasks"),
        (["population.seeds=[0,1,2]"], "population.seeds has 3 values for 2 members"),
        (["grad_cos_every=2"], "grad_cos_every needs one model's per-task gradients"),
        (["population.pbt=true", "population.quantile_fraction=0.7"], r"quantile_fraction in \(0, 0.5\]"),
        (["population.weights=[[1,-1],[1,1]]"], r"population.weights\[0\]=\[1.0, -1.0\] must be finite and non-neg"),
    ],
)
def test_what_a_population_cannot_run_is_refused(overrides, message, make_cfg, tmp_path):
    with pytest.raises(MTLError, match=message):
        run(make_cfg("digits_mtl", weights_arg([[1, 0], [0.5, 0.5]]), *overrides))
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_gradient_clipping_is_per_member(make_cfg):
    from mtl_lightning.population import PopulationModule

    cfg = make_cfg("digits_mtl", "model.depth=1", "model.width=16")
    dm = create_datamodule(cfg.data, 0)
    module = PopulationModule(dm.tasks, 1, dm.img_size, cfg.model, cfg.optim, torch.ones(3, 2), [0, 1, 2])
    for p in module.stacked.values():
        p.grad = torch.zeros_like(p)
        p.grad[0], p.grad[1], p.grad[2] = 10.0, 1e-4, 1.0  # member 0 far above the limit, 1 far below
    before = [p.grad.clone() for p in module.stacked.values()]
    module._clip_per_member(1.0)
    norms = torch.stack([p.grad.flatten(1).pow(2).sum(1) for p in module.stacked.values()]).sum(0).sqrt()
    assert norms[0] == pytest.approx(1.0, rel=1e-4) and norms[2] == pytest.approx(1.0, rel=1e-4)
    assert all(torch.equal(p.grad[1], g[1]) for p, g in zip(module.stacked.values(), before))  # untouched
    clipped = [p.grad.clone() for p in module.stacked.values()]
    for p, g in zip(module.stacked.values(), before):  # fp16: scaled gradients clipped at scale x max_norm
        p.grad = g * 1024.0
    module._clip_per_member(torch.tensor(1024.0))
    assert all(torch.allclose(p.grad / 1024.0, c, rtol=1e-5) for p, c in zip(module.stacked.values(), clipped))


def test_fp16_population_matches_fp32(make_cfg, tmp_path):
    args = [*TINY, weights_arg(W[:2]), "trainer.gradient_clip_val=0.5", "trainer.max_epochs=1"]
    args += ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9"]  # not scale-invariant, unlike Adam
    fp32 = run(make_cfg("digits_mtl", *args, out_dir=tmp_path / "a"))
    fp16 = run(make_cfg("digits_mtl", *args, "trainer.precision=16-mixed", out_dir=tmp_path / "b"))
    for i in range(2):
        assert abs(fp16[f"val/loss/left/m{i}"] - fp32[f"val/loss/left/m{i}"]) < 0.05, i


def test_population_grid_search_writes_the_grid_table(tmp_path, capsys):
    from experiments.search import main

    over = ["data.num_tasks=2", "data.sizes=[300,300]", "trainer.max_epochs=1", f"out_dir={tmp_path}", "logger=csv"]
    argv = ["exp=synthetic_mdl", "search=grid", "search.backend=population", "search.grid=[0.0,0.5,1.0]", *over]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "search" / "synthetic_mdl-grid"
    rows = list(csv.DictReader(open(path / "grid.csv")))
    assert [r["kind"] for r in rows] == ["mix"] * 3 + ["single"] * 2  # the grid's p, then one baseline per task
    assert list(rows[0]) == ["kind", "p", "task", "depth", "width", "steps", "acc_mean", "acc/domain0", "acc/domain1"]
    assert rows[3]["acc/domain1"] == "" and rows[3]["acc_mean"] == rows[3]["acc/domain0"]  # a baseline: its task
    assert len({r["steps"] for r in rows}) == 1 and f"trained {rows[0]['steps']} optimiser steps" in printed
    assert all((path / png).stat().st_size > 0 for png in ("grid_acc_vs_p.png", "grid_capacity.png"))
    members = json.loads(next(path.glob("runs/synthetic_mdl/population-*/members.json")).read_text())
    assert [m["weights"] for m in members] == [[0, 1], [0.5, 0.5], [1, 0], [1, 0], [0, 1]]


def test_population_pbt_moves_toward_the_known_optimum(tmp_path):
    from test_search import NOISY_DOMAIN

    from mtl_lightning.search import compose_search, run_search

    over = [*NOISY_DOMAIN, "trainer.max_epochs=6", f"out_dir={tmp_path}", "logger=csv"]
    start = ["search.initial=[[0.1,0.9],[0.3,0.7],[0.7,0.3],[0.9,0.1]]"]  # symmetric about p0 = 0.5
    scfg, rest = compose_search("synthetic_mdl", ["search=pbt", "search.backend=population", *start, *over])
    out = run_search("synthetic_mdl", rest, scfg)
    assert out["initial_weights_mean"][0] == pytest.approx(0.5, abs=1e-6)
    assert out["final_weights_mean"][0] > 0.5  # domain1's labels are noise: the population moves toward p0 = 1
    assert out["exploits"] >= 1 and out["compute_trial_epochs"] == 4 * 6
    path = tmp_path / "search" / "synthetic_mdl-pbt"
    rows = list(csv.reader(open(path / "best_schedule.csv")))
    assert rows[0] == ["epoch", "domain0", "domain1"] and len(rows) == 1 + 6  # one row per epoch, along the lineage
    assert all(sum(map(float, r[1:])) == pytest.approx(1.0) for r in rows[1:])
    assert (path / "best_schedule.png").stat().st_size > 0


def test_a_study_of_weights_and_seeds_runs_as_one_population(tmp_path):
    from mtl_lightning.search.study import load_study, run_study

    study = tmp_path / "pop.yaml"
    study.write_text(
        "exp: synthetic_mtl\n"
        "overrides: [data.num_tasks=2, data.train_size=300, data.val_size=100, data.test_size=100,"
        " trainer.max_epochs=2]\n"
        "axes: {p: [0.2, 0.8], seed: [0, 1]}\nbackend: population\n"
        "searches: [{name: pbt, backend: population, population: 2, label: pbt-pop}]\n"  # in-process PBT as a row
    )
    out = run_study(*load_study(str(study), [f"study.out_dir={tmp_path / 'st'}", "logger=csv"]))
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    rows = ("p=0.2", "p=0.8", "single-task_task0", "single-task_task1", "pbt-pop")
    assert sorted(cells) == sorted(f"{r}__seed{s}" for r in rows for s in (0, 1))
    (run,) = {c["run_dir"] for c in cells.values()}  # every cell a member of one population
    members = json.loads((out / run / "members.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    pbt = tuple(round(w, 6) for w in meta["searches"]["pbt-pop"]["best_weights"])  # the search's found weights
    assert sorted((m["seed"], tuple(round(w, 6) for w in m["weights"])) for m in members) == sorted(
        (s, w) for s in (0, 1) for w in ((0.2, 0.8), (0.8, 0.2), (1.0, 0.0), (0.0, 1.0), pbt)
    )
    base = cells["single-task_task0__seed1"]["metrics"]  # a baseline member reports its own task only
    assert "test/acc/task0" in base and not any("task1" in k for k in base)
    assert len({c["steps"] for c in cells.values()}) == 1 and (out / "report.md").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "exp: synthetic_mtl\noverrides: [data.num_tasks=2]\naxes: {weighting: [uniform, pcgrad]}\nbackend: population\n"
    )
    with pytest.raises(MTLError, match="cell 'pcgrad__seed0' uses weighting=pcgrad.*study.backend=ray"):
        run_study(*load_study(str(bad), [f"study.out_dir={tmp_path / 'st2'}"]))


def test_chunks_give_the_same_result_and_out_of_memory_shrinks_them(make_cfg, tmp_path, monkeypatch):
    from mtl_lightning.population import PopulationModule

    whole = state(run(make_cfg("digits_mtl", *TINY, weights_arg(W), out_dir=tmp_path / "a")))
    vmap = PopulationModule._vmap
    seen = []

    def tight(self, sl, *args, **kw):  # as if only one member fitted in memory
        seen.append(self.chunk)
        if (sl.stop or self.N) - (sl.start or 0) > 1:
            raise torch.OutOfMemoryError("simulated")
        return vmap(self, sl, *args, **kw)

    monkeypatch.setattr(PopulationModule, "_vmap", tight)
    chunked = state(run(make_cfg("digits_mtl", *TINY, weights_arg(W), "test=false", out_dir=tmp_path / "b")))
    assert seen[:3] == [3, 1, 1]  # halved (3 -> 1) at the first step, then one member at a time
    for k, v in whole.items():
        if k.startswith("stacked."):
            # float tolerance, as against standalone runs: a batched matmul of 3 members sums in another order than of 1
            assert torch.allclose(v, chunked[k], atol=2e-4), (k, (v - chunked[k]).abs().max())
