"""The interface of an architecture, and the MLP block its experts, bottoms and towers are made of."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from ..errors import MTLError
from ..registry import Registry

ARCHITECTURES: Registry = Registry("architecture", "model.architecture")


def mlp(in_dim: int, dims, dropout: float, batchnorm: bool) -> nn.Sequential:
    """Linear -> [BatchNorm1d] -> ReLU -> Dropout per width in `dims` (MTReclib's MultiLayerPerceptron, less its
    output layer); empty `dims`: the identity."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), *([nn.BatchNorm1d(d)] if batchnorm else []), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = d
    return nn.Sequential(*layers)


class Architecture(nn.Module):
    """Maps the backbone's features h to one representation per task, in two parts: `shared(h) -> z`, every task's
    common input (what gradient methods differentiate against in `weighting.mode=rep`, and whose parameters they
    combine in `mode=param`), then `specific(z) -> [rep_k]` (gates, towers: each task's own). `out_dim`: the width of
    each rep_k, the heads' input. `splits = False` for an architecture without such a split (PLE's stacked gates),
    which gradient-level weightings refuse.

    A new one: subclass it, register it with `@ARCHITECTURES.register("name")` (`model.architecture=name`), read its
    options from the model section (`cfg.bottom`, `cfg.tower`, `cfg.experts` ...), set `out_dim`, and list the
    parameters of `shared` in `shared_parameters()`. Guaranteed: h is the backbone's pooled features (B, in_dim), or
    its feature map (B, C, h, w) with dense tasks when `maps_ok` says it can take one; every parameter is trained by
    the model's optimiser and saved in checkpoints."""

    name: ClassVar[str]
    splits: ClassVar[bool] = True
    rep_ok: ClassVar[bool] = True  # `shared` gives one representation every task reads (gradient methods' mode=rep)
    needs_image: ClassVar[bool] = False  # a network from pixels (SegNet, MTAN): model.backbone=none

    @staticmethod
    def maps_ok(cfg) -> bool:
        """Whether it can pass (B, C, h, w) feature maps through (dense tasks)."""
        return False

    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__()
        if spatial and not self.maps_ok(cfg):
            raise MTLError(
                f"model.architecture={self.name} acts on feature vectors; dense tasks need the backbone's feature map "
                "as it is: use model.architecture=hps without model.bottom and model.tower."
            )
        self.num_tasks, self.cfg = num_tasks, cfg
        self.out_dim = in_dim

    def shared(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def specific(self, z: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters of `shared`: what gradient methods treat as shared, with the backbone's."""
        return []

    def forward(self, h: Tensor) -> list[Tensor]:
        return self.specific(self.shared(h))

    def towers(self, in_dim: int) -> nn.ModuleList | None:
        """One tower MLP per task (`model.tower`), or None; sets `out_dim`."""
        c = self.cfg
        self.out_dim = c.tower[-1] if c.tower else in_dim
        if not c.tower:
            return None
        return nn.ModuleList(mlp(in_dim, c.tower, c.dropout, c.batchnorm) for _ in range(self.num_tasks))


def experts_check(cfg, **counts: int) -> None:
    bad = {k: v for k, v in counts.items() if v < 1}
    if bad or not cfg.bottom:
        raise MTLError(
            f"model.architecture={cfg.architecture} needs at least one expert of each kind ({bad or counts}) and "
            f"model.bottom, the experts' MLP widths (got {list(cfg.bottom)}), e.g. model.bottom=[512,256]."
        )
