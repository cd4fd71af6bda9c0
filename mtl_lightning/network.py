"""The network every training mode builds: a timm backbone by name (or the tabular embedding), the architecture
between it and the heads (`model.architecture`), one head per task; and the backbone's features for a batch.

Backbones are timm's: any `timm.list_models()` name, and any model a plugin registers with timm's
`@register_model` (the function takes `pretrained` and timm's keyword arguments such as `in_chans`, and returns
an `nn.Module` with `num_features`, and `forward_features`/`forward_head` or `num_classes=0` giving pooled features;
with dense tasks, `features_only=True` support or a ViT's `forward_intermediates`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from . import famo_cnn, wrn  # noqa: F401  (register wrn28_2 and famo_cnn in timm)
from .adapters import adapt_backbone, per_task
from .architectures import create_architecture
from .errors import MTLError
from .graph import MPNN, GraphFeatures
from .heads import make_head
from .tabular import EmbeddingBackbone, Fields

VIT_MODULES = ("vision_transformer", "deit")
TABULAR = ("embedding",)
GRAPH = ("mpnn",)


class NoBackbone(nn.Module):
    """`model.backbone=none`: the image itself goes to the architecture (SegNet, MTAN: networks from pixels)."""

    def __init__(self, in_chans: int):
        super().__init__()
        self.num_features = in_chans

    def forward(self, x: Tensor) -> list[Tensor]:  # as a timm features_only model: its stages' maps
        return [x]


def is_vit(name: str) -> bool:
    if name in TABULAR or name in GRAPH or name == "none":
        return False
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1] in VIT_MODULES


def create_backbone(cfg, in_chans, img_size: int, spatial: bool = False) -> nn.Module:
    """A timm model by name, without classifier (`num_classes=0`), shaped by the ViT keys when it is a ViT; or, for
    tabular data (`in_chans` is then its `Fields`), the `embedding` backbone (`model.width` is its embedding size).

    `spatial`: the model must give a feature map for dense heads. ViTs do through `forward_intermediates`; other
    models are built with timm's `features_only=True` (their last stage).
    """
    name = cfg.backbone
    if isinstance(in_chans, GraphFeatures) or name in GRAPH:
        if not (isinstance(in_chans, GraphFeatures) and name in GRAPH):
            raise MTLError(
                f"model.backbone={name} does not read this data: graphs need model.backbone=mpnn, and "
                "model.backbone=mpnn needs graphs (data=qm9, data=synthetic_graphs)."
            )
        return MPNN(in_chans, cfg.width or 64, cfg.depth or 3)
    if isinstance(in_chans, Fields) or name in TABULAR:
        if not (isinstance(in_chans, Fields) and name in TABULAR):
            raise MTLError(
                f"model.backbone={name} does not read this data: tabular data needs model.backbone=embedding, and "
                "model.backbone=embedding needs tabular data (data=synthetic_recsys, data=aliexpress)."
            )
        return EmbeddingBackbone(in_chans, cfg.width or 128)
    if name == "none":
        if not spatial or cfg.architecture not in ("segnet", "mtan"):
            raise MTLError(
                "model.backbone=none passes the image itself to the architecture: it serves networks from pixels "
                "(model.architecture=segnet or mtan) on dense tasks."
            )
        return NoBackbone(in_chans)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        raise MTLError(
            f"Unknown timm backbone model.backbone={name!r}. Close names: {', '.join(close) or 'none'}; "
            "all names: python -c 'import timm; print(timm.list_models())'."
        )
    if cfg.input_norm not in INPUT_NORMS:
        raise MTLError(f"Unknown model.input_norm={cfg.input_norm!r}. Valid choices: {', '.join(INPUT_NORMS)}.")
    kwargs = dict(cfg.kwargs or {})
    shape = {
        "depth": cfg.depth,
        "embed_dim": cfg.width,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "mlp_ratio": cfg.mlp_ratio,
    }
    shape = {k: v for k, v in shape.items() if v is not None}
    vit = is_vit(name)
    if vit:
        if cfg.width is not None and cfg.num_heads is None:
            # keep ~64 channels per head, as ViT-Ti/S/B do, with a head count that divides the width
            shape["num_heads"] = min(
                (h for h in range(1, cfg.width + 1) if cfg.width % h == 0),
                key=lambda h: (abs(h - cfg.width / 64), -h),
            )
        kwargs.update(shape, img_size=img_size)
    elif shape:
        raise MTLError(f"model.{'/'.join(shape)} shape ViT backbones only; model.backbone={name} is not a ViT.")
    if spatial and not vit:
        kwargs.update(features_only=True, out_indices=(-1,))
    else:
        kwargs["num_classes"] = 0
    if cfg.checkpoint:  # pretrained weights from disk (offline), through timm's own loading and adaptation
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file(cfg))}
    try:
        backbone = timm.create_model(
            name, pretrained=cfg.pretrained or bool(cfg.checkpoint), in_chans=in_chans, **kwargs
        )
        backbone.input_norm = cfg.input_norm  # how `features` scales stored uint8 images for it
        return backbone
    except (TypeError, ValueError, AssertionError) as e:
        raise MTLError(f"timm could not build model.backbone={name} with {kwargs}: {e}") from None
    except (OSError, RuntimeError) as e:
        if cfg.checkpoint:
            raise MTLError(f"model.checkpoint={cfg.checkpoint} does not load into {name}: {e}") from None
        if cfg.pretrained:
            raise MTLError(
                f"Could not load pretrained weights for {name} ({e}). Without internet, put them in the Hugging "
                "Face cache (HF_HOME) beforehand, or train from scratch with model.pretrained=false."
            ) from None
        raise


def build_network(tasks: Sequence, in_chans, img_size: int, model_cfg):
    """The backbone, the architecture between it and the heads (`model.architecture`), one head per task."""
    spatial = any(t.dense for t in tasks)
    backbone = adapt_backbone(create_backbone(model_cfg, in_chans, img_size, spatial), model_cfg, len(tasks))
    views = [t.name for t in tasks if t.view]
    if per_task(backbone) and views:
        raise MTLError(
            f"model.lora.share={model_cfg.lora.share} gives each task its own adapters, but task(s) {views} read their "
            "own view of the input through an EMA copy of the backbone: use model.lora.share=shared with them."
        )
    if isinstance(backbone, NoBackbone):
        channels, reduction = in_chans, 1
    elif spatial and not is_vit(model_cfg.backbone):  # a timm features_only model: its last stage
        channels, reduction = backbone.feature_info.channels()[-1], backbone.feature_info.reduction()[-1]
    else:
        channels, reduction = backbone.num_features, getattr(backbone, "patch_embed", None)
        reduction = reduction.patch_size[0] if reduction is not None else 1
    arch = create_architecture(model_cfg, channels, len(tasks), spatial)
    if arch.needs_image and not isinstance(backbone, NoBackbone):
        raise MTLError(
            f"model.architecture={model_cfg.architecture} is a whole network from pixels (its own encoder): use it "
            f"with model.backbone=none, not {model_cfg.backbone}."
        )
    sides = img_size if isinstance(img_size, tuple | list) else (img_size, img_size)
    if arch.needs_image and any(s % 32 for s in sides):
        raise MTLError(
            f"model.architecture={model_cfg.architecture} pools the image 5 times: its sides must be multiples of 32 "
            f"(NYUv2 288x384, Cityscapes 128x256), and they are {tuple(sides)}."
        )
    heads = [make_head(model_cfg.head, t, arch.out_dim, spatial, reduction) for t in tasks]
    return backbone, arch, nn.ModuleList(heads)


def label_size(x):
    """The size dense heads resize to: an image batch's (H, W); None for tabular inputs."""
    return x.shape[-2:] if isinstance(x, Tensor) else None


INPUT_NORMS = ("symmetric", "unit", "imagenet")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def scale_images(x: Tensor, norm: str) -> Tensor:
    """uint8 images (B, C, H, W) as floats: [-1, 1], [0, 1], or standardised by ImageNet's statistics."""
    if norm == "symmetric":
        return x.float().div_(127.5).sub_(1.0)
    x = x.float().div_(255.0)
    if norm == "imagenet":
        mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in IMAGENET)
        x = (x - mean) / std
    return x


def weights_file(cfg) -> Path:
    """The file `model.checkpoint` names (a timm or safetensors file of the backbone's weights), checked to be there."""
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise MTLError(
            f"model.checkpoint={cfg.checkpoint} is not a file. Give the weights of {cfg.backbone} as a timm checkpoint "
            "(.pth, .bin) or .safetensors file, e.g. the model.safetensors of its Hugging Face repository "
            f"(timm/{cfg.backbone}), downloaded where there is internet."
        )
    return path


def features(backbone: nn.Module, x, spatial: bool, vit: bool) -> Tensor:
    """The backbone's output: pooled (B, D), or the feature map (B, C, h, w) with dense tasks."""
    if not isinstance(x, Tensor):  # tabular fields (a dict), graphs (a PyG Batch)
        return backbone(x)
    if x.dtype == torch.uint8:  # stored images travel as uint8 and are scaled on the device
        x = scale_images(x, getattr(backbone, "input_norm", "symmetric"))
    if not spatial:
        return backbone(x)
    if vit:  # the last block's patch tokens, final norm applied, as a map
        return backbone.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
    return backbone(x)[-1]
