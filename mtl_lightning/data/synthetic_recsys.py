"""A generated click/conversion log from a known model: the embedded counterpart of AliExpress, for CI and the
quick start (`exp=synthetic_recsys`).

Each impression has categorical fields (ids drawn with popularity skew, p(rank r) ∝ 1/(r + 1)) and standard-normal
numerical features. A latent vector phi = tanh(sum_f E_f[id_f] + A num) (E_f, A fixed random) drives two logits:
click s_c = b_c + signal * w_c . phi, and buy-given-click s_b = b_b + signal * w_b . phi with
w_b = relatedness * w_c + sqrt(1 - relatedness^2) * u (u independent of w_c). click ~ Bernoulli(sigmoid(s_c)),
conversion = click AND Bernoulli(sigmoid(s_b)): conversions only after clicks, as in the real log. Tasks `ctr`
(click) and `ctcvr` (conversion over all impressions), every impression labelled for both. The splits are
consecutive blocks of the generated stream (train, then validation, then test), as a log is split by time.
`relatedness` is the knob for how related the two tasks are; `oracle[split]` holds the true probabilities, whose
AUC bounds what any model can reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import MTLError
from ..tabular import Fields
from ..tasks import Binary
from .base import DATASETS, DataConfig, LabelledTensors, MixtureDataModule


@dataclass
class SyntheticRecsysConfig(DataConfig):
    name: str = "synthetic_recsys"
    field_dims: list[int] = field(default_factory=lambda: [50, 100, 200, 20, 500, 10, 80, 30])
    numerical: int = 8
    latent_dim: int = 8
    relatedness: float = 0.8  # of the buy-given-click model to the click model, in [-1, 1]
    click_rate: float = 0.2  # about: sets the click bias
    buy_rate: float = 0.15  # about: sets the buy-given-click bias (CTCVR about click_rate x buy_rate)
    signal: float = 3.0  # logit scale: higher, more predictable
    train_size: int = 20000
    val_size: int = 5000
    test_size: int = 5000
    batch_size: int = 256


@DATASETS.register("synthetic_recsys")
class SyntheticRecsysDataModule(MixtureDataModule):
    Config = SyntheticRecsysConfig
    img_size = 0

    def __init__(self, cfg: SyntheticRecsysConfig, seed: int = 0):
        if not cfg.field_dims or min(cfg.field_dims) < 1 or cfg.numerical < 0 or cfg.latent_dim < 1:
            raise MTLError(
                f"data.field_dims={list(cfg.field_dims)} needs at least one field of cardinality >= 1, data.numerical "
                f"(got {cfg.numerical}) >= 0 and data.latent_dim (got {cfg.latent_dim}) >= 1."
            )
        if not -1 <= cfg.relatedness <= 1 or not (0 < cfg.click_rate < 1 and 0 < cfg.buy_rate < 1):
            raise MTLError("data.relatedness must lie in [-1, 1], data.click_rate and data.buy_rate in (0, 1).")
        self.in_chans = Fields(tuple(cfg.field_dims), cfg.numerical)
        self.oracle: dict[str, torch.Tensor] = {}
        super().__init__(cfg, seed)

    def describe(self) -> list[Binary]:
        return [Binary("ctr"), Binary("ctcvr")]

    def load(self) -> dict[str, LabelledTensors]:
        c = self.cfg
        g = torch.Generator().manual_seed(c.split_seed)
        F, d = len(c.field_dims), c.latent_dim
        tables = [torch.randn(n, d, generator=g) / math.sqrt(F + 1) for n in c.field_dims]
        A = torch.randn(d, c.numerical, generator=g) / math.sqrt(max(1, c.numerical) * (F + 1))
        w_c = torch.randn(d, generator=g)
        w_c /= w_c.norm()
        u = torch.randn(d, generator=g)
        u -= (u @ w_c) * w_c
        u /= u.norm()
        w_b = c.relatedness * w_c + math.sqrt(1 - c.relatedness**2) * u
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        pops = [1 / torch.arange(1, n + 1).double() for n in c.field_dims]  # popularity skew
        out = {}
        for split, n in (("train", c.train_size), ("val", c.val_size), ("test", c.test_size)):
            ids = torch.stack([torch.multinomial(p, n, replacement=True, generator=g) for p in pops], 1)
            num = torch.randn(n, c.numerical, generator=g)
            phi = torch.tanh(sum(t[ids[:, f]] for f, t in enumerate(tables)) + num @ A.T)
            p_click = torch.sigmoid(logit(c.click_rate) + c.signal * phi @ w_c)
            p_buy = torch.sigmoid(logit(c.buy_rate) + c.signal * phi @ w_b)
            click = torch.rand(n, generator=g) < p_click
            conversion = click & (torch.rand(n, generator=g) < p_buy)
            labels = torch.stack([click, conversion], 1).long()
            self.oracle[split] = torch.stack([p_click, p_click * p_buy], 1)
            out[split] = LabelledTensors({"cat": ids.int(), "num": num}, labels, torch.zeros(n, dtype=torch.long))
        return out
