"""A backbone trained in part: frozen whole (`model.freeze_backbone`: linear probing, only the architecture and the
heads train) or with low-rank adapters (`model.adapter=lora`, LoRA: Hu et al., ICLR 2022, arXiv:2106.09685) injected
by PEFT into the layers `model.lora.targets` names, the rest of the backbone frozen.

PEFT's `inject_adapter_in_model` works on any `nn.Module` by module name, so timm's models need no wrapper: each
targeted layer becomes a LoRA layer holding the original as `base_layer` and the trainable `lora_A`/`lora_B`
(W x + (alpha / r) B A x, B initialised to zero, so training starts from the backbone's own function). A frozen
parameter has `requires_grad=False`: the optimiser never sees it and the gradient methods differentiate the trainable
ones only (`MultiTaskModule.shared_parameters`), which makes `weighting.mode=param` cheap.

Per-task adapters (`model.lora.share=task|both|mtlora`) are PEFT's named adapters in the same layers: one per task
(`task<k>`), beside the shared one (`default`) where `both` or `mtlora` asks. `use_task(backbone, k)` makes task k's
(and the shared) adapters the active ones, so a backbone pass for task k puts only those in the graph: task k's loss
reaches its own adapter and head, never another task's. MTLoRA (Agiza et al., CVPR 2024, arXiv:2403.20320) puts
task-agnostic adapters in a hierarchical ViT's blocks and task-specific ones at each stage's end; `mtlora` is its split
for a plain backbone: shared adapters below, per-task adapters in the last `task_blocks` blocks.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .errors import MTLError

ADAPTERS = (None, "lora")
SHARES = ("shared", "task", "both", "mtlora")
SHARED = "default"  # PEFT's name for a single adapter: the shared LoRA keeps it (runs from before per-task adapters)


def adapt_backbone(backbone: nn.Module, cfg, num_tasks: int = 1) -> nn.Module:
    """Freeze `backbone` (`cfg.freeze_backbone`, or any adapter) and inject the adapter `cfg.adapter`, in place."""
    if cfg.adapter not in ADAPTERS:
        raise MTLError(f"Unknown model.adapter={cfg.adapter!r}. Valid choices: null (none), lora.")
    if cfg.adapter is None and not cfg.freeze_backbone:
        return backbone
    for p in backbone.parameters():
        p.requires_grad_(False)
    if cfg.adapter == "lora":
        inject_lora(backbone, cfg, num_tasks)
    return backbone


def lora_layers(backbone: nn.Module, targets) -> list[str]:
    """The linear and convolutional layers whose names end with one of `targets` (PEFT's matching of a list)."""
    kinds = (nn.Linear, nn.Conv2d)
    return [
        n
        for n, m in backbone.named_modules()
        if isinstance(m, kinds) and any(n == t or n.endswith(f".{t}") for t in targets)
    ]


def inject_lora(backbone: nn.Module, cfg, num_tasks: int = 1) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise MTLError("model.adapter=lora needs PEFT: pip install -e '.[adapters]' (or pip install peft).") from None

    opts = cfg.lora
    targets = list(opts.targets)
    layers = lora_layers(backbone, targets)
    if not layers:
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
    shared, per_task = split_layers(layers, opts)
    config = dict(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout)
    with (
        warnings.catch_warnings()
    ):  # PEFT warns that the model holds adapters already, as every adapter after the first
        warnings.filterwarnings("ignore", message=".*(peft_config|already).*")
        if shared:  # exact names: PEFT matches a target equal to a module's whole name
            inject_adapter_in_model(LoraConfig(**config, target_modules=shared), backbone, adapter_name=SHARED)
        for k in range(num_tasks if per_task else 0):
            inject_adapter_in_model(LoraConfig(**config, target_modules=per_task), backbone, adapter_name=f"task{k}")
    for name, p in backbone.named_parameters():  # only the adapters train
        p.requires_grad_("lora_" in name)
    modules = dict(backbone.named_modules())
    # (layer, whether it holds the shared adapter too), for `use_task`: a plain attribute, copied with the backbone
    backbone.task_layers = [(modules[n], n in shared) for n in per_task]
    # MTLoRA: the blocks below the first per-task one compute the same for every task, once per batch (`each_task`)
    backbone.shared_prefix = shared_prefix(modules, per_task) if shared else None
    # each injection makes its adapter the active one in every LoRA layer, also where it is not: say it per layer
    for n in shared:
        modules[n]._active_adapter = [SHARED]
    for layer, with_shared in backbone.task_layers:
        layer._active_adapter = [SHARED, "task0"] if with_shared else ["task0"]


def split_layers(layers: list[str], opts) -> tuple[list[str], list[str]]:
    """The targeted layers that hold the shared adapter, and those that hold one per task (`opts.share`)."""
    if opts.share not in SHARES:
        raise MTLError(f"Unknown model.lora.share={opts.share!r}. Valid choices: {', '.join(SHARES)}.")
    if opts.share == "shared":
        return layers, []
    if opts.share == "task":
        return [], layers
    if opts.share == "both":
        return layers, layers
    blocks = list(dict.fromkeys(block_of(n) for n in layers))  # in the network's order
    if opts.task_blocks < 1 or opts.task_blocks >= len(blocks) or None in blocks:
        raise MTLError(
            f"model.lora.share=mtlora puts per-task adapters in the last model.lora.task_blocks={opts.task_blocks} "
            f"numbered blocks and shared ones below: it needs 1 <= task_blocks < the {len(blocks)} blocks the targeted "
            f"layers are in ({', '.join(str(b) for b in blocks)})."
        )
    last = set(blocks[-opts.task_blocks :])
    return [n for n in layers if block_of(n) not in last], [n for n in layers if block_of(n) in last]


def block_of(name: str) -> str | None:
    """The innermost numbered block a layer is in: blocks.3.attn.qkv -> blocks.3, layer4.1.conv1 -> layer4.1."""
    m = re.match(r"(.*\.\d+)\.", name)
    return m.group(1) if m else None


def is_task_adapter(name: str) -> bool:
    """Whether a backbone parameter is a per-task adapter's (`lora_A.task1.weight`)."""
    return re.search(r"\.lora_[AB]\.task\d+\.", f".{name}") is not None


def per_task(backbone: nn.Module) -> bool:
    """Whether the backbone holds per-task adapters (a pass per task)."""
    return bool(getattr(backbone, "task_layers", None))


def shared_prefix(modules: dict, per_task: list[str]) -> tuple[nn.Sequential, int] | None:
    """(blocks, i): the first block holding per-task adapters is `blocks[i]` of an `nn.Sequential` (a ViT's `blocks`,
    a ResNet stage) and the blocks before it hold only shared ones. None where there is no such prefix."""
    first = block_of(per_task[0]) if per_task else None
    parent, _, index = (first or "").rpartition(".")
    if not index.isdigit() or int(index) == 0 or not isinstance(modules.get(parent), nn.Sequential):
        return None
    return modules[parent], int(index)


class _Kept(nn.Module):
    """A shared block standing aside for a later task's pass: gives the kept output of the last shared block."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def each_task(backbone: nn.Module, num_tasks: int, forward) -> list:
    """`forward()` once per task, with that task's adapters active: what a backbone with per-task adapters runs.
    With MTLoRA's layout (`shared_prefix`), the blocks below the per-task ones run in the first task's pass only: the
    later passes take their output from it (the same tensor, so the shared adapters' gradient sums every task's)."""
    prefix = getattr(backbone, "shared_prefix", None)
    out, held = [], {}
    for k in range(num_tasks):
        with use_task(backbone, k):
            if prefix is None:
                out.append(forward())
            elif k == 0:  # run in full, keeping the last shared block's output
                hook = prefix[0][prefix[1] - 1].register_forward_hook(lambda m, i, o: held.update(z=o))
                try:
                    out.append(forward())
                finally:
                    hook.remove()
            else:  # the shared blocks stand aside, each giving the kept output
                blocks, i = prefix
                kept = [blocks[j] for j in range(i)]
                for j in range(i):
                    blocks[j] = _Kept(held["z"])
                try:
                    out.append(forward())
                finally:
                    for j, b in enumerate(kept):
                        blocks[j] = b
    return out


@contextmanager
def use_task(backbone: nn.Module, k: int):
    """Task k's adapters (and the shared ones) active in the per-task layers while the block runs. PEFT's own
    `set_adapter` would also make the active adapters trainable and the others frozen: the active list alone here."""
    for layer, with_shared in backbone.task_layers:
        layer._active_adapter = [SHARED, f"task{k}"] if with_shared else [f"task{k}"]
    try:
        yield
    finally:
        for layer, with_shared in backbone.task_layers:
            layer._active_adapter = [SHARED, "task0"] if with_shared else ["task0"]


def base_name(key: str) -> str:
    """A parameter's name in the plain backbone: LoRA keeps the original layer as `<layer>.base_layer`."""
    return key.replace(".base_layer.", ".")


# -- checkpoints that hold what trains ------------------------------------------------------------------------
def trunk_source(cfg) -> str | None:
    """Where the frozen backbone's weights come from when the config alone rebuilds them: a file
    (`model.checkpoint`) or timm's pretrained weights. None for a random trunk (the seed's) or one that `model.init`
    loads from a run: those stay in the checkpoint."""
    if not (cfg.adapter or cfg.freeze_backbone) or cfg.init:
        return None
    if cfg.checkpoint:
        return f"model.checkpoint={cfg.checkpoint}"
    return f"timm's pretrained {cfg.backbone}" if cfg.pretrained else None


def frozen_keys(module: nn.Module) -> list[str]:
    """The state-dict names of the backbone's frozen parameters (buffers, such as BatchNorm statistics, stay)."""
    return [f"backbone.{n}" for n, p in module.backbone.named_parameters() if not p.requires_grad]


def fingerprint(tensors) -> str:
    """A digest of the frozen weights: a checkpoint without them refuses a trunk that is not the one it trained."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def drop_frozen(module: nn.Module, checkpoint: dict, source: str) -> None:
    """Leave the frozen trunk out of `checkpoint` (what `model.checkpoint` or the hub rebuilds), saying where from."""
    keys = frozen_keys(module)
    if not keys:
        return
    state = module.state_dict()
    if not hasattr(module, "_trunk_digest"):  # the trunk never changes: hashed once
        module._trunk_digest = fingerprint(state[k] for k in keys)
    for k in keys:
        checkpoint["state_dict"].pop(k, None)
    checkpoint["frozen_trunk"] = {"source": source, "keys": keys, "fingerprint": module._trunk_digest}


def restore_frozen(module: nn.Module, checkpoint: dict) -> None:
    """Put the frozen trunk this model was built with back into a checkpoint that left it out (`drop_frozen`),
    after checking it is the trunk the run trained on."""
    trunk = checkpoint.get("frozen_trunk")
    if not trunk:
        return
    state = module.state_dict()
    missing = [k for k in trunk["keys"] if k not in state]
    if missing or fingerprint(state[k] for k in trunk["keys"]) != trunk["fingerprint"]:
        raise MTLError(
            f"This checkpoint holds the trained adapters and heads, and its frozen backbone came from "
            f"{trunk['source']}; the backbone built now is not that one ({'layers missing' if missing else 'other'} "
            "weights: the file changed, or another model.* setting). Give the run the weights it trained on."
        )
    checkpoint["state_dict"].update({k: state[k] for k in trunk["keys"]})


# -- task vectors of adapters ---------------------------------------------------------------------------------
def fold_lora(state: dict, scale: float) -> dict:
    """`state` with its LoRA adapters folded into their layers (W + scale B A, summed over the adapters a layer holds,
    as PEFT's merge): the plain model's names and function. Merging adds task vectors entry by entry, and B A is
    bilinear in the adapters: their task vectors are taken on the folded weights, tau_t = s (B_t A_t - B_0 A_0)."""
    deltas = {}
    for k, A in state.items():
        m = re.fullmatch(r"(.*)\.lora_A\.([^.]+)\.weight", k)
        if m:  # Linear: A (r, in), B (out, r); Conv2d: A (r, in, k, k), B (out, r, 1, 1)
            B = state[f"{m.group(1)}.lora_B.{m.group(2)}.weight"]
            deltas[m.group(1)] = deltas.get(m.group(1), 0) + scale * (B.flatten(1).float() @ A.flatten(1).float())
    out = {base_name(k): v for k, v in state.items() if ".lora_" not in k}
    for layer, d in deltas.items():
        w = out[f"{layer}.weight"]
        out[f"{layer}.weight"] = (w.float() + d.view(w.shape)).to(w.dtype)
    return out
