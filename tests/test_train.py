"""End-to-end behaviour of `experiments.run`: learning, weighting, sampling, resume, determinism, bad input."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from experiments.evaluate import main as evaluate_main
from experiments.run import main, run
from mtl_lightning.errors import MTLError, NonFiniteLossError
from mtl_lightning.model import SCHEDULERS
from mtl_lightning.weighting import WEIGHTINGS

SMALL = [
    "data.train_size=4000",
    "data.batch_size=64",
    "data.val_size=500",
    "data.test_size=500",
    "trainer.max_epochs=5",
]
CHANCE = 0.1  # ten digit classes


def test_digits_mtl_learns_both_tasks(make_cfg):
    m = run(make_cfg("digits_mtl", *LEARN))
    assert m["val/acc/left"] > CHANCE + 0.25 and m["val/acc/right"] > CHANCE + 0.25
    assert m["test/acc/left"] > CHANCE + 0.25 and m["test/acc/right"] > CHANCE + 0.25


def test_fixed_zero_weight_task_stays_at_chance(make_cfg):
    m = run(make_cfg("digits_mtl", *LEARN, "weighting=fixed", "weighting.weights=[1,0]"))
    assert m["val/acc/left"] > CHANCE + 0.25
    assert m["val/acc/right"] < CHANCE + 0.07  # its head never trains: near chance


class LabelSpy(Callback):
    def __init__(self):
        self.labelled = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        n = (batch[1] >= 0).sum(0)
        self.labelled = n if self.labelled is None else self.labelled + n


def test_mdl_sample_mixing_honours_probabilities(make_cfg):
    spy = LabelSpy()
    m = run(
        make_cfg("digits_mdl", *SMALL, "trainer.max_epochs=2", "weighting=fixed", "weighting.weights=[1,0]"),
        callbacks=[spy],
    )
    assert spy.labelled[0] > 0 and spy.labelled[1] == 0  # no sample ever drawn from the second domain
    assert m["val/acc/clean"] > CHANCE + 0.25 and m["val/acc/shifted"] < CHANCE + 0.07
    spy = LabelSpy()
    run(
        make_cfg("digits_mdl", *SMALL, "trainer.max_epochs=1", "weighting=fixed", "weighting.weights=[3,1]"),
        callbacks=[spy],
    )
    share = spy.labelled[0].item() / spy.labelled.sum().item()
    assert abs(share - 0.75) < 0.04


class CountTestSamples(Callback):
    def __init__(self):
        self.seen = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += len(batch[0])


def test_limit_test_batches_bounds_the_run_and_its_evaluation(make_cfg, tmp_path):
    over = ["data.train_size=64", "data.test_size=64", "data.eval_batch_size=16", "trainer.max_steps=1"]
    spy = CountTestSamples()
    m = run(make_cfg("digits_mtl", *over, "trainer.limit_test_batches=2"), callbacks=[spy])
    assert spy.seen == 32  # two test batches of the split's four
    full = run(make_cfg("digits_mtl", *over, out_dir=tmp_path / "full"))
    assert m["val/acc_mean"] == full["val/acc_mean"] and m["test/loss/left"] != full["test/loss/left"]
    assert evaluate_main([m["run_dir"], "--out", str(tmp_path / "e.json")]) == 0  # evaluate keeps the bound
    assert json.loads((tmp_path / "e.json").read_text())["test/loss/left"] == pytest.approx(m["test/loss/left"])


class Crash(Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


RESUME = [
    "data.train_size=1200",
    "data.val_size=200",
    "data.test_size=200",
    "data.batch_size=100",
    "trainer.max_epochs=2",
    "checkpoint.every_n_steps=5",
    "test=false",
]  # 12 steps an epoch


def last_weights(m):
    return torch.load(f"{m['run_dir']}/checkpoints/last.ckpt", weights_only=False)["state_dict"]


# A learning budget in which every method clears the learning tests' bars with a margin (188 steps, 47 an epoch)
LEARN = ["data.train_size=3000", "data.batch_size=64", "data.val_size=500", "data.test_size=500"]
LEARN += ["trainer.max_epochs=4", "checkpoint.every_n_steps=90"]
# a one-block ViT of half the main job's width at a higher step size: every method clears its bar (the weakest: RLW's
# right task 0.33, DB-MTL's and PBI's 0.46, against 0.3) in ~60% of the time of two blocks (MoDo fails at width 48)
LEARN += ["model.width=32", "model.depth=1", "optim.lr=5e-3"]
SNAPSHOT_STEP = 180  # mid-epoch 4: the resumed run replays the rest of that epoch


class Snapshot(Callback):
    """Keeps a copy of last.ckpt as it stands when training reaches `at_step` (written there by every_n_steps)."""

    def __init__(self, at_step: int, dest: Path):
        self.at_step, self.dest = at_step, dest

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            shutil.copy(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", self.dest)


def learn_and_resume(make_cfg, tmp_path, *args):
    """One learning run, and a second run resumed from its mid-epoch checkpoint near the end: (metrics of the full
    run, of the resumed run, their final weights). What a resume must match, at the cost of a few steps."""
    snap = tmp_path / "snapshot.ckpt"
    full = run(make_cfg("digits_mtl", *LEARN, *args, out_dir=tmp_path / "a"), callbacks=[Snapshot(SNAPSHOT_STEP, snap)])
    assert torch.load(snap, weights_only=False)["global_step"] == SNAPSHOT_STEP
    resumed = run(make_cfg("digits_mtl", *LEARN, *args, f"resume={snap}", out_dir=tmp_path / "b"))
    for k in ("val/acc/left", "val/acc/right", "val/loss/left", "test/loss/right"):
        assert resumed[k] == pytest.approx(full[k], abs=1e-5), k
    return full, last_weights(full), last_weights(resumed)


def test_resume_mid_epoch_matches_uninterrupted_run(make_cfg, tmp_path):
    full = run(make_cfg("digits_mtl", *RESUME, out_dir=tmp_path / "a"))
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies at step 17; last.ckpt is from step 15
        run(make_cfg("digits_mtl", *RESUME, out_dir=tmp_path / "b"), callbacks=[Crash(17)])
    ckpt = torch.load(next((tmp_path / "b").glob("*/*/checkpoints/last.ckpt")), weights_only=False)
    assert ckpt["global_step"] == 15
    resumed = run(make_cfg("digits_mtl", *RESUME, "resume=last", out_dir=tmp_path / "b"))
    assert resumed["run_dir"] != full["run_dir"]
    for k in ("val/acc/left", "val/acc/right", "val/loss/left"):
        assert resumed[k] == pytest.approx(full[k], abs=1e-6)
    a, b = last_weights(full), last_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_multi_input_run_learns_and_resumes_mid_epoch_exactly(make_cfg, tmp_path):
    # unequal domains (2000, 500, 100), 40 steps an epoch of 50 samples of each: the shorter domains start over
    args = ["data.mixing=multi_input", "data.batch_size=50", "trainer.max_epochs=2", "checkpoint.every_n_steps=5"]
    full = run(make_cfg("synthetic_mdl", *args, out_dir=tmp_path / "a"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        # in the second epoch: a batch sampler's iterator is made before Lightning sets its epoch on a resume
        run(make_cfg("synthetic_mdl", *args, out_dir=tmp_path / "b"), callbacks=[Crash(57)])
    resumed = run(make_cfg("synthetic_mdl", *args, "resume=last", out_dir=tmp_path / "b"))
    for k in ("val/acc/domain0", "val/acc/domain2", "test/acc_mean"):
        assert resumed[k] == pytest.approx(full[k], abs=1e-6), k
    a, b = last_weights(full), last_weights(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert full["val/acc/domain2"] > 0.4  # above chance (1/3) on the smallest domain


def test_same_seed_same_metrics(make_cfg):
    args = ["data.train_size=600", "data.val_size=200", "trainer.max_epochs=1", "test=false"]
    a, b = run(make_cfg("digits_mtl", *args)), run(make_cfg("digits_mtl", *args))
    c = run(make_cfg("digits_mtl", *args, "seed=1"))
    assert a["val/loss/left"] == b["val/loss/left"] and a["val/acc_mean"] == b["val/acc_mean"]
    assert c["val/loss/left"] != a["val/loss/left"]


def test_nan_loss_stops_with_task_name(make_cfg, monkeypatch, capsys):
    from mtl_lightning.data.synthetic import SyntheticDataModule

    load = SyntheticDataModule.load

    def poisoned(self):
        splits = load(self)
        splits["train"].images[:] = math.nan
        return splits

    monkeypatch.setattr(SyntheticDataModule, "load", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \['task0', 'task1', 'task2', 'task3'\]"):
        run(make_cfg("synthetic_mtl", "trainer.max_steps=3"))
    assert (
        main(
            [
                "exp=synthetic_mtl",
                f"out_dir={make_cfg('synthetic_mtl').out_dir}",
                "trainer.enable_progress_bar=false",
                "trainer.max_steps=3",
            ]
        )
        == 2
    )
    assert "NaN/inf at step 0" in capsys.readouterr().err
    assert not list(Path(make_cfg("synthetic_mtl").out_dir).glob("*/*"))  # failed before its first step: no folder


def test_unwritable_out_dir(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MTLError, match="Cannot write to the output directory"):
        run(make_cfg("digits_mtl", out_dir=blocker / "runs"))


def test_resume_errors_and_no_overwrite(make_cfg, tmp_path):
    with pytest.raises(MTLError, match="resume=last found no checkpoint"):
        run(make_cfg("digits_mtl", "resume=last"))
    with pytest.raises(MTLError, match="is not a checkpoint file"):
        run(make_cfg("digits_mtl", "resume=/no/such.ckpt"))
    tiny = ["data.train_size=200", "data.val_size=100", "trainer.max_steps=2", "test=false"]
    keep = run(make_cfg("digits_mtl", *tiny, "run_name=keep", "data.tasks=[left]"))
    with pytest.raises(MTLError, match="already holds checkpoints. Continue it with resume=last run_name=keep"):
        run(make_cfg("digits_mtl", *tiny, "run_name=keep"))
    newer = run(make_cfg("digits_mtl", *tiny))  # the newest run, with both tasks: resume=last must not pick it
    stamp = Path(newer["run_dir"]).name
    assert f"run_name: {stamp}" in (Path(newer["run_dir"]) / "config.yaml").read_text()  # the folder used, not null
    keep_dir = Path(keep["run_dir"])
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    before = {d: files(d) for d in (keep_dir, Path(newer["run_dir"]))}
    configs = {d: (d / "config.yaml").read_text() for d in before}
    # a config whose model differs from the checkpoint's is refused, naming the difference, before any write
    with pytest.raises(MTLError, match=r"tasks \['left'\] there, \['left', 'right'\] here.*Nothing was written"):
        run(make_cfg("digits_mtl", *tiny, "run_name=keep", "resume=last"))
    with pytest.raises(MTLError, match="model.depth 3 there, 2 here"):
        run(make_cfg("digits_mtl", *tiny, "run_name=keep", "resume=last", "data.tasks=[left]", "model.depth=2"))
    with pytest.raises(MTLError, match="found no checkpoint .*/nope/checkpoints/last.ckpt.*resumed: .*keep"):
        run(make_cfg("digits_mtl", *tiny, "run_name=nope", "resume=last"))
    assert {d: files(d) for d in before} == before
    # resume=last run_name=keep continues that run, keeps its config.yaml, and records this command's beside it
    resumed = run(
        make_cfg("digits_mtl", *tiny, "run_name=keep", "resume=last", "data.tasks=[left]", "trainer.max_steps=4")
    )
    assert resumed["run_dir"] == keep["run_dir"]
    assert torch.load(keep_dir / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    assert {d: (d / "config.yaml").read_text() for d in before} == configs
    assert files(Path(newer["run_dir"])) == before[Path(newer["run_dir"])]
    note = (keep_dir / "config.resume-1.yaml").read_text()
    assert "#   resume: None -> 'last'" in note and "#   trainer.max_steps: 2 -> 4" in note
    with pytest.raises(MTLError, match="continues the run .*keep, but run_name=other names another"):
        run(make_cfg("digits_mtl", *tiny, "run_name=other", f"resume={keep_dir}/checkpoints/last.ckpt"))


def test_bad_settings_fail_before_any_write(make_cfg, tmp_path, capsys):
    with pytest.raises(MTLError, match=r"^optim.lr=-0.1 must be > 0\.$"):
        run(make_cfg("digits_mtl", "optim.lr=-0.1"))
    valid = ", ".join(SCHEDULERS)  # every one named
    with pytest.raises(MTLError, match=f"Unknown optim.scheduler='cos'. Valid choices: {valid}"):
        run(make_cfg("digits_mtl", "optim.scheduler=cos"))
    with pytest.raises(MTLError, match=r"optim.warmup=1.5 must lie in \[0, 1\)"):
        run(make_cfg("digits_mtl", "optim.warmup=1.5"))
    assert not (tmp_path / "runs").exists()
    # the command line prints one paragraph, not the resolved config before it
    out = str(tmp_path / "runs")
    assert main(["exp=digits_mtl", f"out_dir={out}", "weighting=fixed", "weighting.weights=[1,2,3]"]) == 2
    captured = capsys.readouterr()
    assert "trainer:" not in captured.out and "weighting.weights" in captured.err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "exp, args, what",
    [
        ("digits_mtl", ["data.train_size=50", "data.drop_last=true"], "a train split of 50 samples"),
        (
            "digits_mtl",
            ["data.train_size=20", "data.train_fraction=0.01"],
            "a train split of 0 samples",
        ),  # a hold-out that keeps none
        ("digits_mtl", ["data.epoch_size=30", "data.drop_last=true"], "data.epoch_size=30 samples"),
        ("digits_mdl", ["data.mixing=multi_input", "data.train_size=40", "data.drop_last=true"], "of 80 samples"),
        (
            "digits_mdl",
            ["data.mixing=sample", "data.train_size=20", "data.train_fraction=0.01"],
            "a train split of 0 samples",
        ),
        ("digits_mtl", ["population.weights=[[1,1],[1,2]]", "data.train_size=20", "data.drop_last=true"], "of 20"),
    ],
)
def test_an_epoch_without_a_step_is_refused_before_any_write(exp, args, what, make_cfg, tmp_path):
    """Issue 35: a run whose epoch had 0 steps exited 0, reported an untrained model and left no checkpoint."""
    cfg = make_cfg(exp, "data.batch_size=64", "data.val_size=20", "data.test_size=20", *args)
    with pytest.raises(MTLError, match=rf"training epoch of 0 steps: .*{what}.*data.batch_size=64"):
        run(cfg)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(MTLError, match=r"limit_train_batches=0 gives every epoch 0 training steps"):
        run(make_cfg("digits_mtl", "trainer.limit_train_batches=0"))
    assert not (tmp_path / "runs").exists()


def test_checkpoint_writes_are_atomic(make_cfg, monkeypatch, tmp_path):
    args = [
        "run_name=r",
        "data.train_size=300",
        "data.val_size=100",
        "data.batch_size=100",
        "trainer.max_epochs=2",
        "test=false",
    ]
    run(make_cfg("digits_mtl", *args, "trainer.max_epochs=1"))
    ckpt_dir = next(tmp_path.glob("runs/*/r/checkpoints"))
    before = (ckpt_dir / "last.ckpt").read_bytes()

    def torn_save(obj, f, *a, **k):  # write half a file, then die (a crash or a full disk)
        f.write(b"\0" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        run(make_cfg("digits_mtl", *args, "resume=last"))
    assert (ckpt_dir / "last.ckpt").read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.ckpt", "last.ckpt"]  # no debris


def test_loggers_and_saved_config(make_cfg):
    m = run(
        make_cfg(
            "digits_mtl",
            "logger=csv,tensorboard,wandb",
            "data.train_size=200",
            "data.val_size=100",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            "test=false",
        )
    )
    d = Path(m["run_dir"])
    header = (d / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert all(k in header for k in ("train/loss/left", "weights/right", "val/acc/left", "val/acc_mean"))
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert list((d / "wandb").glob("offline-run-*"))  # no API key in tests: offline
    assert "max_steps: 3" in (d / "config.yaml").read_text()


def method_args(name):
    cls = WEIGHTINGS.get(name)
    target = ["weighting.target=left"] if cls.auxiliary else []
    # OL-AUX's reference step (0.5) grows an aligned auxiliary's weight to ~5x the target's within 300 steps here
    extra = {"post_train": ["weighting.joint_epochs=2"], "ol_aux": ["weighting.beta=0.05"]}
    extra["stch"] = ["weighting.warmup_epochs=1"]  # STCH proper from epoch 2: the resume (epoch 4) restores its nadir
    # their moving averages of the gradients (memories of ~10 and ~30 steps at the defaults, made for learning rates of
    # 1e-4) lag behind this test's large steps: shorter memories learn above the bar (about 0.45 each)
    extra["db_mtl"], extra["moco"] = ["weighting.beta=0.5"], ["weighting.beta_sigma=0"]
    extra["nash_mtl"] = ["weighting.update_weights_every=4"]  # its cvxpy solve (the reference's option) every 4th step
    extra["auto_lambda"] = ["weighting.every=4"]  # its meta-step (4 passes more) every 4th step: a quarter of the cost
    extra["forum"] = ["weighting.every=4"]  # likewise (8 passes and K backward passes more)
    # its own steps from epoch 3 (from 2 its precision-weighting starves the slower task at this step size: 0.17)
    extra["bayesagg_mtl"] = ["weighting.warmup_epochs=2", "weighting.mc_samples=64"]
    return [f"weighting={name}", *target, *extra.get(name, [])]


def method_learns_and_resumes(name, make_cfg, tmp_path):
    """Every method (here for the loss-level ones, test_gradient for the gradient ones) learns both tasks above
    chance, and a run resumed mid-epoch ends with the same numbers and the same method state."""
    m, a, b = learn_and_resume(make_cfg, tmp_path, *method_args(name))
    # methods that serve a target (left) owe the auxiliary nothing (Post-train forgets it)
    assert m["val/acc/left"] > CHANCE + 0.2 and (m["val/acc/right"] > CHANCE + 0.2 or WEIGHTINGS.get(name).auxiliary)
    # a method that says it carries state saves it (torchjd's, outside the module tree, too), and no other does
    assert any(k.startswith("weighting.") for k in a) == WEIGHTINGS.get(name).stateful
    for k in a:
        pairs = a[k].items() if isinstance(a[k], dict) else [(None, a[k])]  # Nash-MTL's state is a dict
        for key, v in pairs:
            w = b[k] if key is None else b[k][key]
            assert torch.allclose(torch.as_tensor(v).float(), torch.as_tensor(w).float(), atol=1e-5), (k, key)


# every loss-level method but the plain scalarisations (the resume tests above run uniform; fixed is uniform with
# other numbers) and ForkMerge (tests/test_forkmerge.py)
LOSS_LEVEL = [
    n
    for n, cls in WEIGHTINGS.items()
    if not getattr(cls, "gradient_based", False) and n not in ("uniform", "fixed", "forkmerge")
]


@pytest.mark.parametrize("name", LOSS_LEVEL)
def test_loss_level_method_learns_and_resumes_exactly(name, make_cfg, tmp_path):
    method_learns_and_resumes(name, make_cfg, tmp_path)  # DWA leaves uniform from its third epoch


def test_ldc_mtl_router_learns_and_resumes_exactly(make_cfg, tmp_path):
    """LDC-MTL's other form: its router reads the tasks' representations, trains with the model and is checkpointed.
    At this test's step size it starves one task (the weighted mean's gradient in w favours the task whose loss falls
    first, to the clamp: left 0.13, right 0.71), as the reference's single loop does; the free logits learn both."""
    m, a, b = learn_and_resume(make_cfg, tmp_path, "weighting=ldc_mtl", "weighting.router=true")
    assert max(m["val/acc/left"], m["val/acc/right"]) > CHANCE + 0.4
    router = a["weighting.router.weight"]
    assert router.shape[0] == 2 and router.shape[1] % 2 == 0  # K outputs from the K tasks' representations
    for k in (k for k in a if k.startswith("weighting.")):
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_bayesagg_without_a_warm_up_starts_from_its_prior(make_cfg):
    over = ["data.train_size=128", "data.batch_size=32", "trainer.max_steps=2", "test=false"]
    m = run(
        make_cfg("digits_mtl", *over, "weighting=bayesagg_mtl", "weighting.warmup_epochs=0", "weighting.mc_samples=8")
    )
    state = torch.load(f"{m['run_dir']}/checkpoints/last.ckpt", weights_only=False)["state_dict"][
        "weighting._extra_state"
    ]
    n = state["mean/0"].numel()  # the left head's weights and biases: N(0, gamma I) before any epoch of features
    assert torch.equal(state["mean/0"], torch.zeros(n)) and torch.allclose(state["precision/0"], torch.eye(n) / 0.005)
    assert len(state["feats"]) == 64  # the epoch's features so far, kept for the next epoch's posterior


def test_the_best_epoch_report_keeps_a_methods_extra_state(make_cfg):
    """evaluation.report=best (QM9's and CelebA's protocol) copies the module's state at its best epoch: BayesAgg-MTL's
    extra state (a dict of features and posteriors, not a tensor) is copied and restored with it."""
    over = ["data.train_size=64", "data.batch_size=32", "trainer.max_epochs=2", "evaluation.report=best"]
    over += ["weighting=bayesagg_mtl", "weighting.warmup_epochs=0", "weighting.mc_samples=8"]
    m = run(make_cfg("digits_mtl", *over))
    assert all(math.isfinite(m[f"test/acc/{t}"]) for t in ("left", "right"))


class SaveAtValidationEnd(Callback):
    """Saves the run as a search trial's report does: at the first epoch's validation end, before its epoch ends."""

    def __init__(self, dest: Path):
        self.dest = dest

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not self.dest.exists():
            trainer.save_checkpoint(self.dest, weights_only=False)


def test_every_epoch_line_carries_its_metrics_also_after_a_restore_at_validation_end(make_cfg, tmp_path, capsys):
    """Issue 35: a PBT trial restored from its epoch-end report printed `epoch 1/3, step 33:  (0.2 s)` (no metric)."""
    over = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "data.batch_size=64", "test=false"]
    snap = tmp_path / "report.ckpt"
    run(
        make_cfg("digits_mtl", *over, "trainer.max_epochs=2", out_dir=tmp_path / "a"),
        callbacks=[SaveAtValidationEnd(snap)],
    )
    capsys.readouterr()
    run(make_cfg("digits_mtl", *over, "trainer.max_epochs=3", f"resume={snap}", out_dir=tmp_path / "b"))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch ")]
    assert [x.split(",")[0] for x in lines] == ["epoch 2/3", "epoch 3/3"], lines  # epoch 1 was trained before
    assert all("train/loss" in x and "val/acc_mean" in x for x in lines), lines
