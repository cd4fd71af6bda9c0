from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_lightning.config import compose
from mtl_lightning.data import MixtureSampler, create_datamodule
from mtl_lightning.data.base import StratifiedOrder
from mtl_lightning.errors import MTLError
from mtl_lightning.evaluate import find_checkpoint, load_for_evaluation, write_predictions
from mtl_lightning.train import train


def dm_for(exp, *overrides):
    dm = create_datamodule(compose(exp, list(overrides)).data)
    dm.setup()
    return dm


def test_digits_mtl_splits():
    dm = dm_for("digits_mtl", "data.train_size=300", "data.val_size=50", "data.test_size=40")
    assert [t.name for t in dm.tasks] == ["left", "right"] and dm.kind == "mtl"
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 300, "val": 50, "test": 40}
    x, y = dm.splits["train"][:5]
    assert x.shape == (5, 1, 16, 16) and x.dtype == torch.uint8 and y.shape == (5, 2)
    for ds in dm.splits.values():
        assert ds.labels.min() >= 0 and ds.labels.max() <= 9  # every sample labelled for both tasks
    again = dm_for("digits_mtl", "data.train_size=300", "data.val_size=50", "data.test_size=40")
    assert torch.equal(again.splits["test"].images, dm.splits["test"].images)  # fixed splits


def test_digits_mdl_one_label_per_sample():
    dm = dm_for("digits_mdl", "data.train_size=200", "data.val_size=30", "data.test_size=30")
    tr = dm.splits["train"]
    assert len(tr) == 400 and ((tr.labels >= 0).sum(1) == 1).all()
    assert torch.equal((tr.labels >= 0).long().argmax(1), tr.domains)
    clean, shifted = tr.images[tr.domains == 0].float(), tr.images[tr.domains == 1].float()
    assert shifted.mean() > 2 * clean.mean()  # the shifted domain is inverted: visibly different


def test_task_subset_is_single_task_baseline():
    dm = dm_for("digits_mdl", "data.tasks=[shifted]", "data.train_size=100", "data.val_size=10", "data.test_size=10")
    assert [t.name for t in dm.tasks] == ["shifted"]
    tr = dm.splits["train"]
    assert len(tr) == 100 and (tr.labels[:, 0] >= 0).all() and (tr.domains == 0).all()
    with pytest.raises(MTLError, match=r"^Unknown task 'middle' in data.tasks=\['middle'\]; valid: left, right\.$"):
        dm_for("digits_mtl", "data.tasks=[middle]")


def test_sample_mixing_needs_domains():
    with pytest.raises(MTLError, match="data.mixing=sample"):
        dm_for("digits_mtl", "data.mixing=sample")


def test_synthetic_relatedness():
    same = dm_for("synthetic_mtl", "data.relatedness=1.0", "data.train_size=200")
    assert (same.splits["train"].labels == same.splits["train"].labels[:, :1]).all()
    apart = dm_for("synthetic_mtl", "data.relatedness=0.0", "data.train_size=500")
    y = apart.splits["train"].labels
    assert (y[:, 0] == y[:, 1]).float().mean() < 0.6
    mdl = dm_for("synthetic_mdl")
    assert torch.bincount(mdl.splits["train"].domains).tolist() == [2000, 500, 100]


DOMAINS = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)


def test_sampler_honours_probabilities():
    s = MixtureSampler(DOMAINS, torch.tensor([0.2, 0.0, 0.8]), 4000, seed=0)
    counts = torch.bincount(DOMAINS[list(s)], minlength=3).float() / 4000
    assert counts[1] == 0 and abs(counts[0] - 0.2) < 0.03 and abs(counts[2] - 0.8) < 0.03


def test_sampler_deterministic_resumable_and_sharded():
    s = MixtureSampler(DOMAINS, None, None, seed=3)
    first = list(s)
    assert sorted(first) == list(range(1000)) and list(s) == first  # a permutation, same for same epoch
    s.set_epoch(1)
    assert list(s) != first
    s.resume(epoch=1, skip=250)
    full = MixtureSampler(DOMAINS, None, None, seed=3)
    full.set_epoch(1)
    assert list(s) == list(full)[250:]
    ranks = [list(MixtureSampler(DOMAINS, None, None, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 500 and sorted(ranks[0] + ranks[1]) == list(range(1000))


def test_multi_input_batches_hold_every_domain_and_resume():
    from mtl_lightning.data.base import MultiInputBatchSampler

    s = MultiInputBatchSampler(DOMAINS, torch.zeros(1, 1), 32, 600 // 32, seed=4)
    batches = list(s)
    assert len(batches) == 18 and all(len(b) == 96 for b in batches)
    for b in batches:  # 32 of each domain, in domain order (LibMTL's multi-input step: one batch per domain)
        assert DOMAINS[b].tolist() == [0] * 32 + [1] * 32 + [2] * 32
    longest = [i for b in batches for i in b[:32]]
    assert len(set(longest)) == 576  # the longest domain: one pass, no repeat (its last partial batch dropped)
    shortest = [i for b in batches for i in b[64:]]  # 100 samples, 576 slots: whole passes, started over
    assert all(sorted(shortest[k : k + 100]) == list(range(900, 1000)) for k in range(0, 500, 100))
    assert list(MultiInputBatchSampler(DOMAINS, torch.zeros(1, 1), 32, 18, seed=4)) == batches  # deterministic
    s.set_epoch(1)
    second = list(s)
    assert second != batches
    s.resume(epoch=1, skip=5)
    assert list(s) == second[5:]


def test_evaluation_batches_hold_every_domain_in_proportion(make_cfg):
    """A mixture's splits are stored domain after domain: its evaluation loaders interleave them, so a first batch
    (trainer.limit_val_batches, ForkMerge's weighting.val_batches, a method's meta-batch) holds each domain's share,
    not one domain with the others scored on nothing; a predictions file keeps the split's order."""
    order = StratifiedOrder(DOMAINS).order.tolist()
    assert sorted(order) == list(range(1000))  # every sample once
    for sizes in ([600, 300, 100], [7302, 7791, 10925, 25875, 26020, 10458], [5, 5, 5, 5, 5, 1000], [1] * 10 + [100]):
        domains = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])  # ~DomainNet's val halves; skews
        seen = torch.nn.functional.one_hot(domains[StratifiedOrder(domains).order]).double().cumsum(0)
        share = torch.arange(1, len(domains) + 1).double()[:, None] * torch.tensor(sizes).double() / sum(sizes)
        assert (seen - share).abs().max() <= (len(sizes) + 1) / 2  # every prefix holds each domain's share
    dm = dm_for("digits_mdl", "data.val_size=30", "data.test_size=20", "data.eval_batch_size=8")
    for split, loader in [("val", dm.val_dataloader()), ("test", dm.test_dataloader()), ("val", dm.val_dataloader(4))]:
        domains = dm.splits[split].domains
        assert domains.tolist() == sorted(domains.tolist())  # stored by domain: what made a first batch one domain
        assert list(loader.sampler) == StratifiedOrder(domains).order.tolist()
    mtl = dm_for("digits_mtl", "data.val_size=50", "data.test_size=40")  # one domain: the split's own order
    assert list(mtl.val_dataloader().sampler) == list(range(50))
    assert list(mtl.test_dataloader().sampler) == list(range(40))

    over = ["data.train_size=32", "data.val_size=30", "data.test_size=20", "data.eval_batch_size=8"]
    run = train(make_cfg("digits_mdl", *over, "trainer.max_steps=1", "data.batch_size=16"))
    b = load_for_evaluation(find_checkpoint(run["run_dir"]), [])[1]
    out = np.load(write_predictions(b, "test", Path(run["run_dir"]) / "p.npz"))
    labels = b.dm.splits["test"].labels
    for k, t in enumerate(b.dm.tasks):  # row i is the split's sample i
        assert out[f"{t.name}_target"].tolist() == labels[:, k].tolist()


@pytest.mark.parametrize("drop_last, steps", [(True, 2000 // 64), (False, -(-2000 // 64))])
def test_a_multi_input_epoch_is_the_longest_domains(drop_last, steps):
    dm = dm_for("synthetic_mdl", "data.mixing=multi_input", "data.batch_size=64", f"data.drop_last={drop_last}")
    loader = dm.train_dataloader()
    assert len(loader) == steps
    x, y = next(iter(loader))
    assert len(x) == 3 * 64 and ((y >= 0).sum(0) == 64).all()  # 64 labels of each of the 3 domains
    with pytest.raises(MTLError, match="data.mixing=multi_input draws batches by domain.*multi-task"):
        dm_for("synthetic_mtl", "data.mixing=multi_input")
