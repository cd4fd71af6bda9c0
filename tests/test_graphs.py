"""Graphs and scalar regression: QM9 from its raw files through PyG's own processing (known values back, the
references' split, standardisation and complete-graph transform), the MPNN learning a known function of generated
graphs, every weighting taking a step on graphs, ForkMerge on graphs, populations refused, the plateau schedule,
the regression task's loss and MAE, and a missing dependency or dataset as one clear paragraph."""

import math
import sys

import pytest
import torch
from fixtures import qm9_property, write_qm9
from lightning.pytorch.callbacks import Callback

from experiments.run import main, run
from mtl_lightning.config import compose
from mtl_lightning.data import create_datamodule
from mtl_lightning.errors import MTLError
from mtl_lightning.tasks import Regression
from mtl_lightning.weighting import WEIGHTINGS
from mtl_lightning.weighting.gradient import GradientWeighting

pytest.importorskip("torch_geometric")
TINY = ["data.size=48", "data.test_size=8", "data.val_size=8", "data.batch_size=8", "model.width=8", "model.depth=1"]


@pytest.fixture(scope="module")
def qm9_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_qm9(root)
    return root


def qm9(root, *overrides):
    over = [f"data.root={root}", "data.test_size=10", "data.val_size=10", *overrides]
    dm = create_datamodule(compose("qm9_mtl", over).data)
    dm.setup()
    return dm


def test_qm9_is_processed_from_its_raw_files_with_the_references_targets_split_and_transform(qm9_root):
    dm = qm9(qm9_root)
    names = [t.name for t in dm.tasks]
    assert names == ["mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv"]
    splits = {k: dm.splits[k] for k in ("train", "val", "test")}
    assert [len(s) for s in splits.values()] == [39, 10, 10]  # 60 molecules, one uncharacterised
    rows = torch.cat([s.rows for s in splits.values()])
    assert len(set(rows.tolist())) == 59  # disjoint splits covering every kept molecule
    labels = torch.cat([s.labels for s in splits.values()])
    assert torch.allclose(labels.mean(0), torch.zeros(11), atol=1e-5)  # standardised over the whole dataset
    for split in splits.values():
        for i in range(len(split)):
            graph, y = split[i]
            mol = int(graph.idx)  # its line in the raw files
            assert mol != 3  # uncharacterized.txt's molecule is left out
            mu = y[0] * dm.target_std[0] + dm.target_mean[0]  # μ: csv column 3, in Debye (no conversion)
            assert float(mu) == pytest.approx(qm9_property(mol, 3), rel=1e-5)
            n = graph.num_nodes  # the complete graph without self-loops, the distance appended to the bond features
            assert graph.edge_index.shape[1] == n * (n - 1) and graph.edge_attr.shape == (n * (n - 1), 5)
            assert (graph.edge_attr[:, 4] > 0).all()
    assert dm.tasks[2].scale == pytest.approx(float(dm.target_std[2]) * 1000)  # HOMO's MAE in meV
    assert dm.tasks[0].scale == pytest.approx(float(dm.target_std[0]))  # μ's in Debye
    again = qm9(qm9_root)  # the same seed, the same split; another seed, another
    assert torch.equal(again.splits["test"].rows, dm.splits["test"].rows)
    assert not torch.equal(qm9(qm9_root, "data.split_seed=1").splits["test"].rows, dm.splits["test"].rows)


def test_qm9_missing_data_and_missing_dependency_are_clear(tmp_path, capsys, monkeypatch):
    assert main(["exp=qm9_mtl", f"data.root={tmp_path}", f"out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "qm9" in err and "torch_geometric.datasets.QM9" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "torch_geometric", None)  # as if it were not installed
    with pytest.raises(MTLError, match=r"data=qm9 needs PyTorch Geometric, which is not installed: pip install"):
        create_datamodule(compose("qm9_mtl", [f"data.root={tmp_path}"]).data).check()


def test_qm9_raw_files_that_pyg_cannot_read_are_named(tmp_path):
    """Issue 35: a CSV shorter than the SDF, or a malformed uncharacterized.txt, came back as PyG's IndexError."""
    write_qm9(tmp_path)
    raw = tmp_path / "qm9" / "raw"
    good = {p: p.read_text() for p in (raw / "gdb9.sdf.csv", raw / "uncharacterized.txt")}
    check = lambda: create_datamodule(compose("qm9_mtl", [f"data.root={tmp_path}"]).data).check()  # noqa: E731
    lines = good[raw / "gdb9.sdf.csv"].splitlines()
    (raw / "gdb9.sdf.csv").write_text("\n".join(lines[:-3]) + "\n")  # three molecules without targets
    with pytest.raises(MTLError, match=r"gdb9.sdf.csv holds 57 rows of targets for the 60 molecules of .*gdb9.sdf"):
        check()
    (raw / "gdb9.sdf.csv").write_text(good[raw / "gdb9.sdf.csv"])
    (raw / "uncharacterized.txt").write_text(good[raw / "uncharacterized.txt"].replace("     4  gdb_4", "gdb_4"))
    with pytest.raises(MTLError, match=r"uncharacterized.txt, line 10: 'gdb_4 .* does not start with a molecule"):
        check()


def test_the_mpnn_learns_a_known_count_of_generated_molecules(make_cfg):
    over = ["data.size=600", "data.test_size=100", "data.val_size=100", "data.batch_size=32", "model.width=16"]
    m = run(make_cfg("synthetic_graphs", *over, "optim.lr=3e-3", "trainer.max_epochs=8", "test=true"))
    dm = create_datamodule(make_cfg("synthetic_graphs", *over).data)
    dm.setup()
    count = lambda split: dm.splits[split].labels[:, 0] * dm.target_std[0] + dm.target_mean[0]  # noqa: E731
    trivial = (count("test") - count("train").median()).abs().mean()  # always the training median
    assert m["test/type0_atoms/mae"] < 0.75 * trivial  # the atoms of type 0 are counted, not guessed


def weighting_cases():
    for name in WEIGHTINGS.names():
        cls = WEIGHTINGS.get(name)
        extra = {"forkmerge": ["weighting.target=[bonds]"], "post_train": ["weighting.joint_epochs=1"]}.get(name, [])
        extra += ["weighting.target=bonds"] if cls.auxiliary else []
        extra += ["weighting.weights=[1,1,1,1]"] if name == "fixed" else []
        extra += ["weighting.mode=rep"] if issubclass(cls, GradientWeighting) and not cls.param_only else []
        yield name, extra


@pytest.mark.parametrize("name, extra", [pytest.param(n, e, id=n) for n, e in weighting_cases()])
def test_every_weighting_takes_a_step_on_graphs(make_cfg, name, extra):
    """Gradient methods differentiate at the readout's output (mode=rep); ForkMerge evaluates merges on graphs."""
    over = [*TINY, f"weighting={name}", *extra, "trainer.max_epochs=1", "test=false"]
    m = run(make_cfg("synthetic_graphs", *over))
    assert all(math.isfinite(v) for k, v in m.items() if k.startswith("val/") and k.endswith("/mae"))


def test_a_population_of_graph_models_is_refused(make_cfg):
    with pytest.raises(MTLError, match="graph batches .* are not. Train these runs separately"):
        run(make_cfg("synthetic_graphs", *TINY, "population.weights=[[1,1,1,1],[1,0,0,0]]"))


def test_the_plateau_schedule_lowers_the_rate_after_patience_epochs(make_cfg):
    class Flat(Callback):  # the monitored validation loss never improves after the first epoch
        rates = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_validation_end(self, trainer, pl_module):
            trainer.callback_metrics["val/loss/bonds"] = torch.tensor(1.0)

    over = [*TINY, "optim.scheduler=plateau", "optim.patience=0", "optim.gamma=0.5", "optim.min_lr=2.6e-4"]
    over += ["optim.lr=1e-3", "trainer.max_epochs=5", "checkpoint.monitor=val/loss/bonds"]
    flat = Flat()
    run(make_cfg("synthetic_graphs", *over), callbacks=[flat])
    # patience 0: every epoch without a better value multiplies the rate by gamma, down to min_lr
    assert flat.rates == pytest.approx([1e-3, 1e-3, 5e-4, 2.6e-4, 2.6e-4])
    with pytest.raises(MTLError, match=r"optim.patience=-1 must be >= 0"):
        run(make_cfg("synthetic_graphs", *TINY, "optim.patience=-1"))


def test_regression_masks_missing_targets_and_reports_mae_in_the_tables_units():
    t = Regression("homo", scale=2.0)
    pred = torch.tensor([[1.0], [2.0], [5.0]])
    target = torch.tensor([0.0, float("nan"), 3.0])
    loss, n = t.loss(pred, target)
    assert n == 2 and loss.item() == pytest.approx((1 + 4) / 2)  # MSE over the two targets
    metrics = t.make_metrics()
    t.update(metrics, pred, target)
    assert metrics["mae"].compute().item() == pytest.approx(2.0 * (1 + 2) / 2)  # in the reported units


def test_generated_targets_are_standardised_then_scaled_and_atoms_bounded():
    over = ["data.size=400", "data.test_size=50", "data.val_size=50", "data.atoms=[9,27]"]
    dm = create_datamodule(compose("synthetic_graphs", [*over, "data.scales=[0.001,0.01,0.1,1]"]).data)
    dm.setup()
    y = torch.cat([dm.splits[s].labels for s in ("train", "val", "test")])
    assert y.mean(0).abs().max() < 1e-6 and torch.allclose(y.std(0), torch.tensor([0.001, 0.01, 0.1, 1]), rtol=1e-4)
    atoms = [int(g.num_nodes) for g in dm.splits["train"].graphs]
    assert min(atoms) >= 9 and max(atoms) <= 27 and abs(sum(atoms) / len(atoms) - 18) < 1  # QM9's size
    for bad, key in (("data.atoms=[1,5]", "data.atoms"), ("data.scales=[1,-1,1,1]", "data.scales")):
        with pytest.raises(MTLError, match=key):
            create_datamodule(compose("synthetic_graphs", [*over, bad]).data).setup()
