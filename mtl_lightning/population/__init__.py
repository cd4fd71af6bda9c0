"""Populations: N models with the same architecture and different scalarization weights (and seeds) trained as one
vectorised LightningModule, optionally with in-process PBT over the weights. `population.weights=[[...], ...]` turns
a run into a population; `search.backend=population` runs a weight grid or PBT this way."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import PopulationConfig, config_from_dict, with_weighting, write_atomic
from ..data import create_datamodule
from ..errors import MTLError
from ..model import higher_is_better
from ..network import build_network, is_vit
from ..tasks.delta_m import delta_flag
from ..weighting import check_weights
from .module import Member, PopulationModule, check_vectorisable
from .pbt import PopulationPBT, copy_member

FUSED = ("auto", "on", "off")


def plan_population(cfg: DictConfig, tasks: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Check a population's settings against what can be vectorised: its (N, K) weights (normalised as configured)
    and its members' seeds. Every refusal names the reason and the alternative."""
    p = cfg.population
    rows = [check_weights(w, tasks, f"population.weights[{i}]") for i, w in enumerate(p.weights)]
    W = torch.stack([w / w.sum() if p.normalize else w for w in rows])
    seeds = list(p.seeds) or [cfg.seed] * len(rows)
    if len(seeds) != len(rows):
        raise MTLError(f"population.seeds has {len(seeds)} values for {len(rows)} members: give one per member.")
    ray_grid = "Train it as separate runs instead (search.backend=ray, the default)."
    if cfg.weighting.name not in ("uniform", "fixed"):
        raise MTLError(
            f"A population's members differ in fixed scalarization weights (population.weights); weighting="
            f"{cfg.weighting.name} learns or combines weights per step (or forks branches), which one vectorised "
            f"population cannot run per member. {ray_grid}"
        )
    if cfg.grad_cos_every:
        raise MTLError(f"grad_cos_every needs one model's per-task gradients; a population has {len(rows)}. {ray_grid}")
    if p.chunk_size < 0 or p.fused_attn not in FUSED:
        raise MTLError(
            f"population.chunk_size={p.chunk_size} must be >= 0 (0: all members at once) and population.fused_attn="
            f"{p.fused_attn!r} one of {', '.join(FUSED)}."
        )
    if cfg.trainer.strategy not in ("auto", "single_device") or cfg.trainer.devices not in (1, "1", "auto"):
        raise MTLError(
            "A population trains on one device (trainer.devices=1); several devices train several populations as "
            "Ray trials (search.backend=population with several search.capacities)."
        )
    if p.pbt:
        if len(rows) < 2 or not 0 < p.quantile_fraction <= 0.5 or p.perturbation_interval < 1:
            raise MTLError(
                f"population.pbt needs at least 2 members (got {len(rows)}), population.quantile_fraction in "
                f"(0, 0.5] (got {p.quantile_fraction}) and population.perturbation_interval >= 1 (got "
                f"{p.perturbation_interval})."
            )
        if not 0 < p.weight_low <= 1:
            raise MTLError(f"population.weight_low={p.weight_low} must lie in (0, 1].")
    return W, seeds


def check_population(cfg: DictConfig) -> None:
    """Every refusal a population run of `cfg` gives before its first step, without training or writing anything:
    what a study checks before its first cell. The network is built on the meta device (no memory, no init)."""
    dm = create_datamodule(cfg.data, cfg.seed)
    plan_population(cfg, [t.name for t in dm.tasks])
    if dm.in_chans is None:  # tabular fields, whose sizes come from the data files: checked when the run starts
        return
    with torch.device("meta"):
        net = build_network(dm.tasks, dm.in_chans, dm.img_size, cfg.model)
    spatial = any(t.dense for t in dm.tasks)
    check_vectorisable(Member(*net, dm.tasks, spatial, is_vit(cfg.model.backbone)), cfg.model.backbone)


def pbt_callback(cfg: DictConfig, tasks, has_base: bool, monitor: str) -> PopulationPBT:
    """The in-process PBT callback of `population.pbt`, ranking members by `population.metric` (auto: the monitor)."""
    p = cfg.population
    metric = monitor if p.metric == "auto" else p.metric
    higher = higher_is_better(metric, tasks, delta_flag(cfg, has_base), "population.metric")
    stage, _, name = metric.partition("/")
    if stage != "val":
        raise MTLError(f"population.metric={metric!r} must be a validation metric (val/...): it ranks the members.")
    return PopulationPBT(
        name, higher, p.perturbation_interval, p.quantile_fraction, p.resample_probability, p.weight_low, p.pbt_seed
    )


def member_config(cfg: DictConfig, weights: list[float], seed: int) -> DictConfig:
    """The standalone config of one member: weighting=fixed with its (normalised) weights, its seed, no population."""
    return with_weighting(
        cfg,
        {"name": "fixed", "weights": [float(w) for w in weights], "normalize": True},
        seed=seed,
        population=OmegaConf.to_container(OmegaConf.structured(PopulationConfig)),
    )


def export_member(source: PopulationModule | str | Path, i: int, dest: str | Path) -> Path:
    """Member i as an ordinary single-model checkpoint (its weights, its standalone config as hyperparameters), which
    `mtl_lightning.checkpoint.load_model` loads as a `MultiTaskModule`. `source`: the module, or a population's
    checkpoint file."""
    if isinstance(source, PopulationModule):
        hp, state, tasks = dict(source.hparams), source.stacked_state(), [t.name for t in source.tasks]
        weights, seeds, step = source.member_weights.tolist(), source.member_seeds, source.global_step
    else:
        ckpt = torch.load(source, map_location="cpu", weights_only=False)
        if "population" not in ckpt:
            raise MTLError(f"{source} is not a population's checkpoint (it holds one model already).")
        hp, step, tasks = ckpt["hyper_parameters"], ckpt.get("global_step", 0), ckpt["tasks"]
        names, seeds = ckpt["population"]["names"], ckpt["population"]["seeds"]
        weights = ckpt["state_dict"]["member_weights"].tolist()
        state = _member_states(ckpt["state_dict"], names)
    if not 0 <= i < len(seeds):
        raise MTLError(f"member {i} does not exist: the population has members 0..{len(seeds) - 1}.")
    cfg = member_config(config_from_dict(hp, "the population's hyperparameters"), weights[i], seeds[i])
    out = {
        "state_dict": {k: v[i].clone() for k, v in state.items()},
        "hyper_parameters": OmegaConf.to_container(cfg, resolve=True),
        "tasks": tasks,
        "global_step": step,
        "member": i,
    }
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dest)
    return dest


def _member_states(state_dict: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """The stacked tensors of a population's state dict, under a single model's names."""
    out = {}
    for n in names:
        out[n] = state_dict[f"stacked.{n.replace('.', '__')}"]
    for k, v in state_dict.items():
        if k.startswith("stacked_buffers."):
            out[k[len("stacked_buffers.") :].replace("__", ".")] = v
    return out


def write_member_metrics(
    run_dir: Path, metrics: dict[str, float], weights: list[list[float]], seeds: list[int]
) -> None:
    """Each member's final metrics in `members/m<i>/metrics.json` (what delta_m.runs and the reports read), and the
    members' weights and seeds in `members.json`."""
    for i in range(len(seeds)):
        mine = {k[: -len(f"/m{i}")]: v for k, v in metrics.items() if k.endswith(f"/m{i}")}
        write_atomic(run_dir / "members" / f"m{i}" / "metrics.json", json.dumps(mine, indent=1, sort_keys=True))
    rows = [{"member": i, "seed": s, "weights": w} for i, (s, w) in enumerate(zip(seeds, weights))]
    write_atomic(run_dir / "members.json", json.dumps(rows, indent=1))


__all__ = [
    "PopulationModule",
    "PopulationPBT",
    "check_population",
    "copy_member",
    "export_member",
    "member_config",
    "pbt_callback",
    "plan_population",
    "write_member_metrics",
]
