"""Merging methods (issue 37) against their papers' definitions on hand-made task vectors, and task vectors of real
state dicts."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from mtl_lightning.errors import MTLError
from mtl_lightning.merging import MERGINGS, create_merging, task_vectors, to_state_dict
from mtl_lightning.merging.dare import drop_and_rescale
from mtl_lightning.merging.ties import disjoint_mean, elect, trim

# three task vectors of six entries: TIES with keep = 0.5 keeps each one's three largest magnitudes
TAU = torch.tensor(
    [
        [3.0, -1.0, 0.5, 2.0, -4.0, 1.0],
        [-2.0, 2.0, 1.0, -3.0, -1.0, 0.2],
        [1.0, 3.0, -2.0, 1.0, 5.0, -0.1],
    ]
)


def test_ties_trims_elects_and_takes_the_disjoint_mean_as_the_paper():
    trimmed = trim(TAU, 0.5)
    assert trimmed.tolist() == [[3, 0, 0, 2, -4, 0], [-2, 2, 0, -3, 0, 0], [0, 3, -2, 0, 5, 0]]
    # the elected sign is the sign of the trimmed vectors' sum (1, 5, -2, -1, 1, 0); the last entry, which no task
    # kept, takes the sign of the whole sum of signs (+)
    assert elect(trimmed).tolist() == [1, 1, -1, -1, 1, 1]
    # per entry, the mean of the values that agree with it: 3; (2 + 3)/2; -2; -3; 5 (the -4 disagrees); nothing: 0
    assert disjoint_mean(trimmed, elect(trimmed)).tolist() == [3, 2.5, -2, -3, 5, 0]
    theta0 = torch.arange(6.0)
    merged = create_merging("ties").merge(theta0, TAU, keep=0.5, lam=0.8)
    assert torch.allclose(merged, theta0 + 0.8 * torch.tensor([3, 2.5, -2, -3, 5, 0]))
    assert torch.equal(trim(TAU, 1.0), TAU) and not trim(TAU, 0.0).any()


def test_task_arithmetic_adds_the_scaled_sum_and_averaging_is_its_one_over_t():
    theta0 = torch.ones(6)
    assert torch.allclose(create_merging("task_arithmetic").merge(theta0, TAU, lam=0.3), theta0 + 0.3 * TAU.sum(0))
    models = theta0 + TAU
    assert torch.allclose(create_merging("average").merge(theta0, TAU), models.mean(0))
    assert torch.allclose(create_merging("task_arithmetic").merge(theta0, TAU, lam=1 / 3), models.mean(0))


def test_dare_drops_a_fraction_p_and_rescales_so_the_expectation_stays():
    tau = torch.full((2, 200_000), 2.0)
    sparse = drop_and_rescale(tau, 0.7, torch.Generator().manual_seed(0))
    assert (sparse == 0).float().mean().item() == pytest.approx(0.7, abs=0.005)
    assert torch.allclose(sparse[sparse != 0], torch.tensor(2.0 / 0.3))
    assert sparse.mean().item() == pytest.approx(2.0, abs=0.02)  # the expectation of every entry is kept
    # on top of its base method, reproducibly from its seed; p = 0 is the base method itself
    dare = create_merging("dare", p=0.5, base="ties")
    assert torch.equal(dare.merge(torch.zeros(6), TAU, keep=0.5, lam=1.0), dare.merge(torch.zeros(6), TAU, keep=0.5))
    plain = create_merging("dare", p=0.0).merge(torch.zeros(6), TAU, lam=0.3)
    assert torch.allclose(plain, 0.3 * TAU.sum(0))
    with pytest.raises(MTLError, match="merging.p=1.0 must be in"):
        create_merging("dare", p=1.0)
    with pytest.raises(MTLError, match="merging.base='average'.*Valid choices: task_arithmetic, ties"):
        create_merging("dare", base="average")


@pytest.mark.parametrize("name", MERGINGS.names())
def test_every_merging_method_keeps_the_start_for_zero_task_vectors_and_names_its_options(name):
    method = create_merging(name)
    theta0 = torch.randn(50, generator=torch.Generator().manual_seed(1))
    for coefficients in method.grid():
        assert torch.equal(method.merge(theta0, torch.zeros(3, 50), **coefficients), theta0)
    assert repr(method).startswith(type(method).__name__ + "(")


def test_unknown_merging_lists_the_valid_ones():
    with pytest.raises(MTLError, match="Unknown merging method merging='tie'. Did you mean 'ties'.*Valid choices"):
        create_merging("tie")


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, 2))


def test_task_vectors_of_state_dicts_round_trip_and_other_architectures_are_refused():
    torch.manual_seed(0)
    start = Net().state_dict()
    models = []
    for i in range(2):
        net = Net()
        net.load_state_dict(start)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (i + 1))
        net.body[1].num_batches_tracked += 5  # an integer entry: not merged, kept from the start
        models.append(net.state_dict())
    theta0, tau, keys = task_vectors(start, models)
    assert "body.1.num_batches_tracked" not in keys and tau.shape == (2, theta0.numel())
    merged = to_state_dict(create_merging("average").merge(theta0, tau), start, keys)
    assert torch.allclose(merged["body.0.weight"], (models[0]["body.0.weight"] + models[1]["body.0.weight"]) / 2)
    assert merged["body.1.num_batches_tracked"] == start["body.1.num_batches_tracked"]
    Net().load_state_dict(merged)  # a state dict the model loads
    with pytest.raises(MTLError, match="Cannot merge wide: .*of another shape: body.0.weight.*same weights"):
        task_vectors(start, [models[0], Net(width=8).state_dict()], names=["narrow", "wide"])


# -- a merging run: warm-up, task models, merge, coefficients chosen on validation --------------------------------
DIGITS = ["model.width=32", "model.depth=2", "optim.lr=5e-3", "data.train_size=3000", "data.batch_size=64"]
DIGITS += ["data.val_size=300", "data.test_size=300", "trainer.max_epochs=2", "merging.warmup_epochs=2"]


def merging_budget(steps: int, warmup: bool):
    from mtl_lightning.config import compose
    from mtl_lightning.merging.run import budget

    cfg = compose("digits_mtl", [f"trainer.max_steps={steps}", f"merging.warmup_epochs={int(warmup)}", "merging=ties"])
    return budget(cfg, 2)


def _ckpt_file(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _ckpt(run):
    return torch.load(Path(run) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_a_merging_run_fine_tunes_each_task_from_the_warm_up_and_merges_them(make_cfg, tmp_path):
    from experiments.evaluate import main as evaluate_main
    from experiments.run import run

    m = run(make_cfg("digits_mtl", *DIGITS, "merging=task_arithmetic", "run_name=ta"))
    run_dir = Path(m["run_dir"])
    record = json.loads((run_dir / "merging.json").read_text())
    lam = record["chosen"]["lam"]
    assert lam == max(record["tried"], key=lambda r: r["val/acc_mean"])["lam"]  # the best on validation
    start, left, right = (_ckpt(p) for p in (record["start"], record["models"]["left"], record["models"]["right"]))
    # each task model started from the warm-up (model.init) and trained alone: 2 epochs of 47 steps each, as it
    assert start["global_step"] == left["global_step"] == right["global_step"] == 94
    assert m["merging/steps"] == 3 * 94 and record["steps"] == {"warmup": 94, "left": 94, "right": 94}
    merged = _ckpt(run_dir)["state_dict"]
    for k, v in merged.items():
        if k.startswith("backbone."):  # theta_0 + lambda (tau_left + tau_right)
            want = start["state_dict"][k] + lam * (
                left["state_dict"][k] + right["state_dict"][k] - 2 * start["state_dict"][k]
            )
            assert torch.allclose(v, want, atol=1e-5), k
    for i, own in enumerate((left, right)):  # each task keeps its own model's head
        assert torch.equal(merged[f"heads.{i}.weight"], own["state_dict"]["heads.0.weight"])
    assert m["val/acc/left"] > 0.2 and m["val/acc/right"] > 0.2  # both tasks above chance (0.1)
    out = tmp_path / "eval.json"
    assert evaluate_main([str(run_dir), "--out", str(out)]) == 0  # the merged model evaluates to its numbers
    assert json.loads(out.read_text())["test/acc_mean"] == pytest.approx(m["test/acc_mean"], abs=1e-6)

    # the same task models merged again, by every method, without training (merging.models)
    given = [
        f"merging.start={record['start']}",
        f"merging.models=[{record['models']['left']},{record['models']['right']}]",
    ]
    for name in MERGINGS.names():
        over = [f"merging={name}", f"run_name=again-{name}", "merging.lambdas=[0.3]", "merging.ada_steps=20", *given]
        again = run(make_cfg("digits_mtl", *DIGITS, *over))
        assert again["merging/steps"] == 3 * 94 and 0 <= again["val/acc_mean"] <= 1
    avg = _ckpt(Path(tmp_path / "runs" / "digits_mtl" / "again-average"))["state_dict"]
    k = "backbone.blocks.0.mlp.fc1.weight"
    assert torch.allclose(avg[k], (left["state_dict"][k] + right["state_dict"][k]) / 2, atol=1e-6)
    # AdaMerging: its entropy on the validation inputs fell, from task arithmetic's merge at lambda = 0.3 (its start)
    ada = json.loads((tmp_path / "runs" / "digits_mtl" / "again-adamerging" / "merging.json").read_text())["learned"]
    assert ada["entropy"][1] < ada["entropy"][0] and len(ada["lambdas"]) == 2 and len(ada["lambdas"][0]) > 2
    zero = run(make_cfg("digits_mtl", *DIGITS, "merging=adamerging", "run_name=ada0", "merging.ada_steps=0", *given))
    ta = json.loads((tmp_path / "runs" / "digits_mtl" / "again-task_arithmetic" / "metrics.json").read_text())
    assert zero["val/acc_mean"] == pytest.approx(ta["val/acc_mean"], abs=1e-6)  # both theta_0 + 0.3 sum_t tau_t
    # pretrained weights as theta_0 without a warm-up (model.init here, as a checkpoint on disk would be), on a budget
    # in steps (a study's): the task models share all of it, as there is no warm-up
    over = ["merging=average", "run_name=pre", "merging.warmup_epochs=0", "trainer.max_steps=41"]
    pre = run(make_cfg("digits_mtl", *DIGITS, *over, f"model.init={record['start']}"))
    pre_record = json.loads((Path(pre["run_dir"]) / "merging.json").read_text())
    assert pre_record["steps"] == {"warmup": 0, "left": 21, "right": 20} and pre["merging/steps"] == 41
    theta0 = _ckpt_file(pre_record["start"])["state_dict"]["backbone.cls_token"]
    assert torch.equal(theta0, start["state_dict"]["backbone.cls_token"])
    # with a warm-up, a quarter of the budget goes to it
    assert merging_budget(40, warmup=True) == (10, [15, 15]) and merging_budget(41, warmup=True) == (10, [16, 15])
    # a model that did not start from merging.start is refused, in one paragraph
    bad = [f"merging.start={record['models']['left']}", f"merging.models=[{record['models']['right']}]"]
    with pytest.raises(MTLError, match="was not fine-tuned from merging.start"):
        run(make_cfg("digits_mtl", *DIGITS, "merging=average", "run_name=bad", *bad))


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.architecture=mmoe"], "needs the plain shared network"),
        (["weighting=pcgrad"], "weighting=pcgrad and population.* do not apply"),
        (["merging.warmup_epochs=-1"], "merging.warmup_epochs=-1 must be >= 0"),
        (["merging.start=somewhere"], "merging.start and merging.models go together"),
        (["merging.keeps=[1.5]"], "merging.keeps=1.5 must be in"),
        (["merging=dare", "merging.base=average"], "merging.base='average'"),
        (["merging=adamerging", "merging.granularity=block"], "merging.granularity='block'"),
        (["merging.warmup_fraction=1.0"], "merging.warmup_fraction=1.0 must be in"),
    ],
)
def test_a_merging_run_refuses_what_it_cannot_merge_before_training(make_cfg, tmp_path, args, message):
    from experiments.run import run

    name = [] if any(a.startswith("merging=") for a in args) else ["merging=ties"]
    with pytest.raises(MTLError, match=message):
        run(make_cfg("digits_mtl", *name, *args))
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_model_init_starts_a_run_from_another_runs_weights_heads_by_task(make_cfg, tmp_path):
    from mtl_lightning.checkpoint import init_weights
    from mtl_lightning.config import compose
    from mtl_lightning.train import build

    small = ["model.width=16", "model.depth=1"]
    joint = build(compose("digits_mtl", [*small, "seed=1"])).model
    path = tmp_path / "joint.ckpt"
    torch.save({"state_dict": joint.state_dict(), "tasks": ["left", "right"]}, path)
    alone = build(compose("digits_mtl", [*small, "seed=2", "data.tasks=[right]"])).model
    assert not torch.equal(alone.backbone.patch_embed.proj.weight, joint.backbone.patch_embed.proj.weight)
    init_weights(alone, path)
    for k, v in joint.backbone.state_dict().items():
        assert torch.equal(alone.backbone.state_dict()[k], v), k
    assert torch.equal(alone.heads[0].weight, joint.heads[1].weight)  # the head of its own task, "right"
    wider = build(compose("digits_mtl", ["model.width=32", "model.depth=1"])).model
    with pytest.raises(MTLError, match="model.init=.*cannot start this model.*same backbone"):
        init_weights(wider, path)
    with pytest.raises(MTLError, match="model.init=.*no checkpoint there"):
        init_weights(alone, tmp_path / "nowhere")


def test_a_missing_start_is_named_before_a_run_but_does_not_stop_a_resume(tmp_path):
    """model.init's checkpoint is checked with the settings (a study's --check too); a resumed run has its own weights,
    so a start deleted since does not keep it from continuing."""
    from mtl_lightning.checks import check_settings
    from mtl_lightning.config import compose

    with pytest.raises(MTLError, match=r"model.init=.*nowhere: no checkpoint there"):
        check_settings(compose("digits_mtl", [f"model.init={tmp_path / 'nowhere'}"]))
    (tmp_path / "last.ckpt").touch()  # the run's own checkpoint, which resumes it
    check_settings(compose("digits_mtl", [f"model.init={tmp_path / 'nowhere'}", f"resume={tmp_path / 'last.ckpt'}"]))
    with pytest.raises(MTLError, match=r"model.checkpoint=.*trunk.pth is not a file"):
        check_settings(compose("digits_mtl", [f"model.checkpoint={tmp_path / 'trunk.pth'}"]))


# --- task models resumed one by one, and trained in parallel on Ray (issue 37) ------------------------------------

SMALL = ["model.width=32", "model.depth=2", "optim.lr=5e-3", "data.train_size=600", "data.batch_size=64"]
SMALL += ["data.val_size=128", "data.test_size=128", "trainer.max_epochs=1", "merging.warmup_epochs=1"]
SMALL += ["merging=task_arithmetic", "merging.lambdas=[0.5,1.0]", "checkpoint.every_n_steps=1"]


class Crash(Exception):
    pass


class CrashIn(Callback):
    """A crash in the task model `task` at its step `step`, after that step's checkpoint (every_n_steps=1)."""

    def __init__(self, task: str, step: int):
        self.task, self.step = task, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if Path(trainer.default_root_dir).name == self.task and trainer.global_step == self.step:
            raise Crash(f"{self.task} at step {self.step}")


def _task_states(run_dir: Path) -> dict:
    record = json.loads((run_dir / "merging.json").read_text())
    return {t: _ckpt(p)["state_dict"] for t, p in record["models"].items()}


def _same_states(a: dict, b: dict) -> None:
    for t in a:
        assert a[t].keys() == b[t].keys()
        for k in a[t]:
            assert torch.allclose(a[t][k].float(), b[t][k].float(), atol=1e-6), (t, k)


def test_an_interrupted_task_model_continues_from_its_checkpoint_to_the_uninterrupted_result(make_cfg):
    """A merging run that crashes in its second task model, run again: the finished task model is kept, the
    interrupted one continues from its last.ckpt (not from its start), and the merge equals the uninterrupted run's."""
    from experiments.run import run

    whole = run(make_cfg("digits_mtl", *SMALL, "run_name=whole"))
    with pytest.raises(Crash):
        run(make_cfg("digits_mtl", *SMALL, "run_name=cut"), callbacks=[CrashIn("right", 4)])
    cut = Path(whole["run_dir"]).parent / "cut"
    left_done = (cut / "tasks" / "digits_mtl" / "left" / "metrics.json").stat().st_mtime
    assert not (cut / "tasks" / "digits_mtl" / "right" / "metrics.json").exists()
    assert _ckpt(cut / "tasks" / "digits_mtl" / "right")["global_step"] == 4  # its checkpoint at the crash
    again = run(make_cfg("digits_mtl", *SMALL, "run_name=cut"))
    assert (cut / "tasks" / "digits_mtl" / "left" / "metrics.json").stat().st_mtime == left_done  # kept
    assert (cut / "tasks" / "digits_mtl" / "right" / "config.resume-1.yaml").exists()  # continued, not restarted
    _same_states(_task_states(cut), _task_states(Path(whole["run_dir"])))
    assert again["test/acc_mean"] == pytest.approx(whole["test/acc_mean"], abs=1e-6)


@pytest.mark.xdist_group("ray")  # conftest.py says why
def test_task_models_trained_in_parallel_on_ray_equal_the_sequential_ones(make_cfg, shared_ray):
    """merging.parallel=true trains each task model as a Ray task; each equals the one trained in-process."""
    from experiments.run import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker (OMP_NUM_THREADS=1): every sum in the same order
    try:
        seq = run(make_cfg("digits_mtl", *SMALL, "run_name=seq"))
        par = run(make_cfg("digits_mtl", *SMALL, "run_name=par", "merging.parallel=true", "merging.cpus_per_model=1"))
    finally:
        torch.set_num_threads(threads)
    _same_states(_task_states(Path(par["run_dir"])), _task_states(Path(seq["run_dir"])))
    assert par["test/acc_mean"] == pytest.approx(seq["test/acc_mean"], abs=1e-6)
    assert par["merging/steps"] == seq["merging/steps"]
