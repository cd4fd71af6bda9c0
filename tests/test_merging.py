"""Merging methods (issue 37) against their papers' definitions on hand-made task vectors, and task vectors of real
state dicts."""

import pytest
import torch
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
