"""Hard parameter sharing (Caruana, 1997; Ruder, arXiv:1706.05098): one shared bottom MLP (`model.bottom`; none:
the backbone's features as they are, the default), then one tower MLP per task (`model.tower`; none by default).
MTReclib's shared-bottom model is `model.bottom=[512,256] model.tower=[128,64]`."""

from __future__ import annotations

from torch import Tensor, nn

from .base import ARCHITECTURES, Architecture, mlp


@ARCHITECTURES.register("hps")
class HPS(Architecture):
    @staticmethod
    def maps_ok(cfg) -> bool:  # the identity passes feature maps through
        return not (cfg.bottom or cfg.tower)

    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__(in_dim, num_tasks, cfg, spatial)
        self.bottom = mlp(in_dim, cfg.bottom, cfg.dropout, cfg.batchnorm)
        self.task_towers = self.towers(cfg.bottom[-1] if cfg.bottom else in_dim)

    def shared(self, h: Tensor) -> Tensor:
        return self.bottom(h)

    def specific(self, z: Tensor) -> list[Tensor]:
        return [z] * self.num_tasks if self.task_towers is None else [t(z) for t in self.task_towers]

    def shared_parameters(self):
        return list(self.bottom.parameters())

    def __repr__(self) -> str:
        return f"HPS(bottom={list(self.cfg.bottom)}, tower={list(self.cfg.tower)})"


@ARCHITECTURES.register("libmtl_office")
class LibMTLOffice(HPS):
    """LibMTL's Office encoder above the ResNet-18 (its `examples/office`): the shared bottom `model.bottom=[512]`
    (Linear-BN-ReLU-Dropout 0.5 with model.batchnorm and model.dropout), its Linear weights drawn from N(0, 0.005)
    and its biases 0.1, as that code initialises them."""

    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__(in_dim, num_tasks, cfg, spatial)
        for m in self.bottom.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.005)
                nn.init.constant_(m.bias, 0.1)

    def __repr__(self) -> str:
        return f"LibMTLOffice(bottom={list(self.cfg.bottom)})"
