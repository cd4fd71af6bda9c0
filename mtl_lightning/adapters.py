"""A backbone trained in part: frozen whole (`model.freeze_backbone`: linear probing, only the architecture and the
heads train) or with low-rank adapters (`model.adapter=lora`, LoRA: Hu et al., ICLR 2022, arXiv:2106.09685) injected
by PEFT into the layers `model.lora.targets` names, the rest of the backbone frozen.

PEFT's `inject_adapter_in_model` works on any `nn.Module` by module name, so timm's models need no wrapper: each
targeted layer becomes a LoRA layer holding the original as `base_layer` and the trainable `lora_A`/`lora_B`
(W x + (alpha / r) B A x, B initialised to zero, so training starts from the backbone's own function). A frozen
parameter has `requires_grad=False`: the optimiser never sees it and the gradient methods differentiate the trainable
ones only (`MultiTaskModule.shared_parameters`), which makes `weighting.mode=param` cheap.
"""

from __future__ import annotations

from torch import nn

from .errors import MTLError

ADAPTERS = (None, "lora")


def adapt_backbone(backbone: nn.Module, cfg) -> nn.Module:
    """Freeze `backbone` (`cfg.freeze_backbone`, or any adapter) and inject the adapter `cfg.adapter`, in place."""
    if cfg.adapter not in ADAPTERS:
        raise MTLError(f"Unknown model.adapter={cfg.adapter!r}. Valid choices: null (none), lora.")
    if cfg.adapter is None and not cfg.freeze_backbone:
        return backbone
    for p in backbone.parameters():
        p.requires_grad_(False)
    if cfg.adapter == "lora":
        inject_lora(backbone, cfg)
    return backbone


def lora_layers(backbone: nn.Module, targets) -> list[str]:
    """The linear and convolutional layers whose names end with one of `targets` (PEFT's matching of a list)."""
    kinds = (nn.Linear, nn.Conv2d)
    return [
        n
        for n, m in backbone.named_modules()
        if isinstance(m, kinds) and any(n == t or n.endswith(f".{t}") for t in targets)
    ]


def inject_lora(backbone: nn.Module, cfg) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise MTLError("model.adapter=lora needs PEFT: pip install -e '.[adapters]' (or pip install peft).") from None

    opts = cfg.lora
    targets = list(opts.targets)
    if not lora_layers(backbone, targets):
        names = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
        raise MTLError(
            f"model.lora.targets={targets} name no linear or convolutional layer of model.backbone={cfg.backbone}. "
            f"Its linear layers end in: {', '.join(names) or 'none'} (a target matches a name's last parts, such as "
            "attn.qkv)."
        )
    if opts.rank < 1 or opts.alpha <= 0 or not 0 <= opts.dropout < 1:
        raise MTLError(
            f"model.lora: rank={opts.rank} must be >= 1, alpha={opts.alpha} > 0 and dropout={opts.dropout} in [0, 1)."
        )
    config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets)
    inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():  # only the adapters train
        p.requires_grad_("lora_" in name)


def base_name(key: str) -> str:
    """A parameter's name in the plain backbone: LoRA keeps the original layer as `<layer>.base_layer`."""
    return key.replace(".base_layer.", ".")
