import pytest
import torch

from mtl_lightning.errors import MTLError
from mtl_lightning.weighting import WEIGHTINGS, create_weighting

TASKS = ["a", "b", "c"]


def make(name, tasks=TASKS, **kw):
    cls = WEIGHTINGS.get(name)
    if name == "fixed":
        kw.setdefault("weights", [1.0] * len(tasks))
    return cls(tasks, cls.Config(**kw))


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_properties(name):
    w = make(name)
    losses = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    loss, weights = w(losses)
    assert loss.ndim == 0 and torch.isfinite(loss) and weights.shape == (3,)
    assert not weights.requires_grad and (weights >= 0).all()
    loss.backward()
    assert torch.isfinite(losses.grad).all() and (losses.grad > 0).all()  # every task gets a learning signal
    # identical tasks are treated alike, and a permutation of the tasks permutes the weights
    same = w(torch.ones(3))[1]
    assert torch.allclose(same, same[0].expand(3))
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(w(losses.detach()[perm])[1], weights[perm])
    assert name in repr(w) or "tasks=" in repr(w)


@pytest.mark.parametrize("name", ["uniform", "fixed"])
def test_scalarizations_define_mixture_probs(name):
    p = make(name).mixture_probs()
    assert torch.allclose(p.sum(), torch.tensor(1.0)) and (p >= 0).all()


def test_fixed_normalises_to_simplex_or_not():
    losses = torch.tensor([1.0, 1.0, 1.0])
    assert torch.allclose(make("fixed", weights=[3, 1, 0])(losses)[1], torch.tensor([0.75, 0.25, 0.0]))
    raw = make("fixed", weights=[3, 1, 0], normalize=False)
    assert torch.allclose(raw(losses)[0], torch.tensor(4.0))
    assert torch.allclose(raw.mixture_probs(), torch.tensor([0.75, 0.25, 0.0]))


@pytest.mark.parametrize(
    "weights, expected",
    [
        (None, "required"),
        ([1, 1], "2 values but there are 3 tasks"),
        ([1, -1, 1], "non-negative"),
        ([1, float("nan"), 1], "finite"),
        ([0, 0, 0], "all zero"),
    ],
)
def test_fixed_rejects_bad_weights(weights, expected):
    with pytest.raises(MTLError, match=expected):
        make("fixed", weights=weights)


def test_unknown_weighting_lists_choices():
    with pytest.raises(MTLError, match="Valid choices: fixed, uniform"):
        create_weighting(TASKS, type("C", (), {"name": "pcgradd"})())
