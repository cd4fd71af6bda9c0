"""Semi-supervised learning with self-supervised auxiliary tasks: rotation views and labels, the labelled subset and
the half-labelled batches, the EMA teacher, ZCA whitening, every weighting with view-owning tasks, bad input."""

import pytest
import torch

from experiments.run import run
from mtl_lightning.data import create_datamodule
from mtl_lightning.data.base import LabelledTensors, SemiSupervisedBatchSampler
from mtl_lightning.data.classic import gcn, zca_apply, zca_fit
from mtl_lightning.data.ssl import augment, hold_out, keep_labels
from mtl_lightning.errors import MTLError
from mtl_lightning.tasks import Classification, Exemplar, Rotation
from mtl_lightning.tasks.views import ExemplarHead
from mtl_lightning.weighting import WEIGHTINGS


def test_rotation_views_come_back_with_their_rotation():
    x = torch.arange(2 * 16.0).view(2, 1, 4, 4)  # no symmetry: every rotation is a different image
    views, labels = Rotation().views(x, torch.tensor([0, -1]))  # the second image is not the task's
    assert views.shape == (4, 1, 4, 4) and labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(views[0], x[0])
    assert torch.equal(views[1], x[0].transpose(-2, -1).flip(-2))  # 90 degrees anticlockwise, as ARML's code
    assert torch.equal(views[2], x[0].flip(-2).flip(-1))
    assert torch.equal(views[3], x[0].transpose(-2, -1).flip(-1))
    # the view's label is the rotation that produced it: undoing it gives the image back
    for k in range(4):
        assert torch.equal(torch.rot90(views[k], -int(labels[k]), dims=(-2, -1)), x[0])


def test_translation_is_a_window_of_the_reflected_image_and_seeded():
    x = torch.randn(32, 3, 8, 8)
    out = augment(x, ["translate"], torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    shifts = []
    for i in range(len(x)):  # each image is one 8 x 8 window of its own padded copy, shifted by at most 2 pixels
        hits = [(a, b) for a in range(5) for b in range(5) if torch.equal(out[i], padded[i, :, a : a + 8, b : b + 8])]
        assert hits
        shifts.append(hits[0])
    assert len(set(shifts)) > 5  # per image, not one shift for the batch
    assert torch.equal(out, augment(x, ["translate"], torch.Generator().manual_seed(0)))  # a resumed run repeats it


def ids_split(n=600, classes=10):
    """A split whose 'images' are their own row ids, labels cycling over the classes, plus a self-supervised column."""
    labels = torch.stack([torch.arange(n) % classes, torch.zeros(n, dtype=torch.long)], 1)
    return LabelledTensors(torch.arange(n)[:, None].float(), labels, torch.zeros(n, dtype=torch.long))


class Cfg:
    labels_per_class, split_seed, batch_size, labelled_share = 4, 0, 10, 0.5


def test_labelled_subset_is_balanced_seeded_and_disjoint_from_validation():
    tasks = [Classification("y", 10), Rotation()]
    train, val = hold_out(ids_split(), 100, seed=0)
    ids = lambda ds: set(ds.images[:, 0].long().tolist())  # noqa: E731
    assert len(ids(train)) == 500 and len(ids(val)) == 100 and not ids(train) & ids(val)
    ssl, kept = keep_labels(train, tasks, Cfg)
    y = ssl.labels[:, 0]
    assert (y >= 0).sum() == 40 and torch.bincount(y[y >= 0], minlength=10).tolist() == [4] * 10  # balanced
    assert (ssl.labels[:, 1] == 0).all()  # the self-supervised task applies to every image, labelled or not
    assert torch.equal(keep_labels(train, tasks, Cfg)[1], kept)  # seeded
    Other = type("Other", (Cfg,), {"split_seed": 1})
    assert not torch.equal(keep_labels(train, tasks, Other)[1], kept)
    sampler = SemiSupervisedBatchSampler(kept, len(ssl.labels), Cfg, num_batches=20, seed=0)
    for batch in list(sampler):  # each batch: 5 labelled images, then 5 unlabelled ones
        assert (y[batch[:5]] >= 0).all() and (y[batch[5:]] == -1).all()
    with pytest.raises(MTLError, match=r"data.labels_per_class=60, but class 0 of y has \d+ training images"):
        keep_labels(train, tasks, type("Many", (Cfg,), {"labels_per_class": 60}))


def test_ema_teacher_follows_its_rule_and_gets_no_gradient():
    torch.manual_seed(0)
    backbone, arch = torch.nn.Linear(3, 4), torch.nn.Identity()
    arch.shared, arch.specific = (lambda h: h), (lambda z: [z])
    head = ExemplarHead(ema=0.95)
    head.attach(backbone, torch.nn.Sequential())
    teacher = head.teacher["backbone"]
    assert all(not p.requires_grad for p in head.teacher.parameters())
    module = type("M", (), {"backbone": backbone, "arch": torch.nn.Sequential(), "spatial": False, "vit": False})()
    before = teacher.weight.clone()
    with torch.no_grad():
        backbone.weight.add_(1.0)
    for step, a in ((0, 0.0), (3, 0.75), (100, 0.95)):  # a = min(1 - 1 / (step + 1), 0.95): ARML's ramp
        t0 = teacher.weight.clone()
        head.ema_update(module, step)
        assert torch.allclose(teacher.weight, a * t0 + (1 - a) * backbone.weight)
    assert not torch.equal(teacher.weight, before)
    task = Exemplar()
    x = torch.randn(8, 3)
    student = backbone(x)
    loss, n = task.loss(student, teacher(x).detach())
    loss.backward()
    assert n == 8 and backbone.weight.grad is not None and teacher.weight.grad is None


def test_zca_whitens_its_fitting_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, 4, 4, generator=g) @ torch.randn(4, 4, generator=g)  # correlated pixels
    mean, W = zca_fit(x, scale=0.0)
    white = zca_apply(x, mean, W).flatten(1).double()
    assert torch.allclose(torch.cov(white.T), torch.eye(48, dtype=torch.float64), atol=1e-3)
    cov = torch.cov(x.flatten(1).double().T)
    mean, W = zca_fit(x, scale=0.1)  # ARML's regularised form: eigenvalues l / (l + 0.1)
    lam = torch.linalg.eigvalsh(cov)
    got = torch.linalg.eigvalsh(torch.cov(zca_apply(x, mean, W).flatten(1).double().T))
    assert torch.allclose(got, (lam / (lam + 0.1)).sort().values, atol=1e-4)
    few = torch.randn(20, 3, 4, 4, generator=g) @ torch.randn(4, 4, generator=g)  # fewer images than pixels
    xc = few.flatten(1).double() - few.flatten(1).double().mean(0)
    S, U = torch.linalg.eigh(torch.cov(xc.T) + 0.1 * torch.eye(48, dtype=torch.float64))  # the full d x d route
    assert torch.allclose(zca_fit(few, scale=0.1)[1], (U * (1 / torch.sqrt(S.clamp(min=0) + 1e-10))) @ U.T, atol=1e-8)
    img = gcn(torch.rand(5, 3, 4, 4))
    assert torch.allclose(img.flatten(1).mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(img.flatten(1).norm(dim=1), torch.full((5,), 55.0, dtype=torch.float64))


SSL = ["data.train_size=600", "data.val_size=200", "data.test_size=200", "data.labels_per_class=5"]
SSL += ["data.aux_tasks=[rotation,exemplar]", "data.tasks=[clean,rotation,exemplar]", "model.depth=1"]


def test_digits_ssl_splits_and_bad_input(make_cfg):
    dm = create_datamodule(make_cfg("digits_ssl", *SSL).data, 0)
    dm.setup()
    y = dm.splits["train"].labels
    assert [t.name for t in dm.tasks] == ["clean", "rotation", "exemplar"]
    assert torch.bincount(y[y[:, 0] >= 0, 0], minlength=10).tolist() == [5] * 10 and (y[:, 1:] == 0).all()
    for over, message in [
        ("data.labels_per_class=0", "keep at least one label per class"),
        ("data.labels_per_class=500", "data.labels_per_class=500, but class 0 of clean has"),
        ("data.aux_tasks=[jigsaw]", "Unknown task 'jigsaw' in data.aux_tasks; valid: rotation, exemplar"),
        ("data.augment_ops=[mixup]", "Unknown augmentation 'mixup' in data.augment_ops; valid: flip, translate, noise"),
    ]:
        with pytest.raises(MTLError, match=message):
            d = create_datamodule(make_cfg("digits_ssl", *SSL, over).data, 0)
            d.setup()
    with pytest.raises(MTLError, match="data.aux_tasks and data.augment_ops transform images"):
        create_datamodule(make_cfg("synthetic_recsys", "data.aux_tasks=[rotation]").data, 0)


GRADIENT = [n for n in WEIGHTINGS.names() if getattr(WEIGHTINGS.get(n), "gradient_based", False)]


@pytest.mark.parametrize("name", [n for n in WEIGHTINGS.names() if n not in ("fixed",)])
def test_every_weighting_trains_a_step_with_view_tasks(name, make_cfg):
    over = [*SSL, f"weighting={name}", "trainer.max_steps=1", "trainer.limit_val_batches=1", "test=false"]
    if WEIGHTINGS.get(name).auxiliary or name == "forkmerge":
        over.append("weighting.target=[clean]" if name == "forkmerge" else "weighting.target=clean")
    if name == "post_train":
        over.append("weighting.joint_epochs=1")
    if name in GRADIENT:
        over.append("weighting.mode=param")
    if getattr(WEIGHTINGS.get(name), "linear_heads", False):  # BayesAgg-MTL: not for view tasks
        with pytest.raises(MTLError, match=f"weighting={name} needs"):
            run(make_cfg("digits_ssl", *over))
        return
    m = run(make_cfg("digits_ssl", *over))
    assert all(m[f"val/loss/{t}"] == m[f"val/loss/{t}"] for t in ("clean", "rotation", "exemplar"))  # not NaN
    assert -1 <= m["val/exemplar/cos"] <= 1 and 0 <= m["val/acc/rotation"] <= 1
    if name in GRADIENT and not WEIGHTINGS.get(name).param_only:  # those refuse rep mode for every model
        with pytest.raises(MTLError, match="task\\(s\\) \\['rotation', 'exemplar'\\] read their own view"):
            run(make_cfg("digits_ssl", *over, "weighting.mode=rep"))


def test_a_population_refuses_view_tasks(make_cfg, tmp_path):
    with pytest.raises(MTLError, match=r"Task\(s\) \['rotation', 'exemplar'\] read their own view.*search.backend=ray"):
        run(make_cfg("digits_ssl", *SSL, "population.weights=[[1,1,1],[1,2,1]]"))
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
