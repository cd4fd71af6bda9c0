"""The typed base config, and composing it with an experiment's delta and `key=value` overrides.

Every experiment YAML is a short delta over `Config`. The `data` and `weighting` sections are typed by the
dataclass of the mixture / method they name (`data.name`, `weighting.name`), so an unknown key or a value of the
wrong type anywhere fails with a message naming the key and the valid ones.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .data import DATASETS, DataConfig
from .errors import MTLError
from .plugins import load_plugins
from .weighting import WEIGHTINGS


@dataclass
class LoraOptions:
    """Low-rank adapters (`model.adapter=lora`), injected by PEFT into the backbone's layers that `targets` names."""

    rank: int = 8  # r: each adapted layer W (out x in) gains B (out x r) A (r x in), r (in + out) parameters
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    # layer names matched by their last parts: a timm ViT's attention projections and MLP (ResNets: conv1, conv2 ...)
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])
    # who trains which adapter: shared (one LoRA, every task's loss) | task (one LoRA per task in every targeted layer:
    # each task's loss reaches only its own, a backbone pass per task) | both (a shared and a per-task LoRA in every
    # targeted layer, summed) | mtlora (MTLoRA's split: a shared, task-agnostic LoRA in every block but the last
    # `task_blocks`, whose layers hold one LoRA per task)
    share: str = "shared"
    task_blocks: int = 1  # mtlora: the last numbered blocks (a ViT's blocks.<i>, a ResNet's layer<s>.<i>) per task


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch16_224"  # any timm model name; ViT-shape keys below apply to ViTs only
    depth: int | None = None  # ViT blocks (the paper varies 3, 6, 9); None keeps the timm model's own; mpnn: steps (3)
    width: int | None = None  # ViT token dim (the paper varies 48, 96, 144, 192); embedding, mpnn: their width
    num_heads: int | None = None  # default: the divisor of width closest to width/64
    patch_size: int | None = None  # "ViT-S/4" is patch_size=4
    mlp_ratio: float | None = None
    pretrained: bool = False
    # the pretrained weights from a file on disk (a timm checkpoint, .pth/.bin, or .safetensors): offline, instead of
    # the hub's download; timm adapts them as for `pretrained` (the classifier dropped, a ViT's positions resized)
    checkpoint: str | None = None
    # a run folder (its last.ckpt) or a .ckpt whose weights start this model: every parameter of the same name and
    # shape, each head from the head of the same task (merging's task models start from its warm-up this way)
    init: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # anything else timm.create_model accepts
    # between the backbone and the heads (mtl_lightning/architectures): hps | mmoe | cgc | ple
    architecture: str = "hps"
    bottom: list[int] = field(default_factory=list)  # hps: shared bottom MLP; experts' MLP widths (ple: per level)
    tower: list[int] = field(default_factory=list)  # each task's tower MLP widths before its head
    experts: int = 8  # mmoe
    shared_experts: int = 4  # cgc, ple
    task_experts: int = 4  # cgc, ple: per task
    dropout: float = 0.0  # in every MLP of the architecture
    batchnorm: bool = False  # BatchNorm1d after each MLP layer (MTReclib's MLPs have it)
    widths: list[int] = field(default_factory=list)  # segnet, mtan: the 5 stages' widths; [] = [64,128,256,512,512]
    # stored uint8 images, scaled on the device: symmetric ([-1, 1]) | unit ([0, 1], FAMO's) | imagenet (ImageNet's
    # mean and deviation, what ImageNet weights expect: LibMTL's Office)
    input_norm: str = "symmetric"
    head: str = "light"  # dense tasks' heads: light (ours) | conv (MTAN's) | deeplab (LibMTL's ASPP); tasks/heads.py
    # train the backbone in part (mtl_lightning/adapters.py): frozen whole (linear probing: the architecture and the
    # heads train), or lora: low-rank adapters (PEFT) in the layers model.lora.targets names, the rest frozen
    freeze_backbone: bool = False
    adapter: str | None = None  # null | lora
    lora: LoraOptions = field(default_factory=LoraOptions)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05  # not applied to biases and norm weights
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | step | milestones | plateau | constant
    warmup: float = 0.1  # cosine: fraction of the total steps with a linear warm-up
    step_epochs: int = 100  # step: multiply the lr by gamma every step_epochs epochs
    milestones: list[float] = field(default_factory=list)  # milestones: multiply by gamma at these step fractions
    gamma: float = 0.5
    patience: int = 5  # plateau: epochs without a better checkpoint.monitor before lr x gamma (QM9's references)
    min_lr: float = 0.0  # plateau: the lr's floor (QM9's references: 1e-5)
    weighting_lr: float | None = None  # the weighting's own parameters' lr (Nash-MTL's and FAMO's 0.025); None: lr


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int = -1
    accelerator: str = "auto"  # auto picks the GPU when there is one
    devices: Any = "auto"
    strategy: str = "auto"
    precision: str = "32-true"  # e.g. bf16-mixed
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None  # a quick look (an int: batches, a float: a fraction); evaluate keeps it
    gradient_clip_val: float | None = None
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True  # a bar in a terminal; else (or with false) a line per epoch
    enable_model_summary: bool = False  # Lightning's table of modules (the run's summary line counts parameters)
    deterministic: bool = False  # deterministic CUDA kernels: a resumed GPU run then matches bit for bit
    compile: bool = False  # torch.compile the network (a population: its vectorised call); for GPUs (guide/gpu.md)
    early_stopping_patience: int = 0  # stop after this many validations without a better checkpoint.monitor (0: off)


@dataclass
class CheckpointConfig:
    # best.ckpt is best by it (maximised or minimised by its direction); auto: val/delta_m with base results, else
    # val/acc_mean with classification tasks, else the first task's primary metric
    monitor: str = "auto"
    every_n_steps: int | None = None  # also refresh last.ckpt every N steps (mid-epoch resume)


@dataclass
class WandbConfig:
    project: str = "mtl_lightning"
    entity: str | None = None
    mode: str = "auto"  # auto: online with an API key, offline without | online | offline
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # default: the experiment name (a search groups its trials under its own name)


@dataclass
class DeltaMConfig:
    """Base results for Δm% (logged as val/delta_m and test/delta_m when given): single-task run directories (their
    metrics.json, each stage its own numbers) and/or numbers by metric name (`seg/miou: 0.3869`, both stages)."""

    runs: list[str] = field(default_factory=list)
    base: dict[str, float] = field(default_factory=dict)
    # libmtl: per task first, higher is better (ours); nashmtl: flat over metrics, lower is better (their tables)
    convention: str = "libmtl"


@dataclass
class EvaluationConfig:
    """What a run reports at its end (mtl_lightning/protocol.py): the final model's metrics (final); the mean of the
    last `last_epochs` epochs' test-split evaluations (last_mean, Nash-MTL's); the best validation epoch's (best)."""

    report: str = "final"
    last_epochs: int = 10


@dataclass
class PopulationConfig:
    """N members trained as one vectorised model (`mtl_lightning.population`); off while `weights` is empty."""

    weights: list[list[float]] = field(default_factory=list)  # one weight vector per member (as weighting=fixed)
    seeds: list[int] = field(default_factory=list)  # one per member (initialisation, dropout); default: the run's
    normalize: bool = True  # divide each member's weights by their sum, as weighting.normalize
    chunk_size: int = 0  # members per vectorised forward/backward (bounds memory); 0: all at once
    fused_attn: str = "auto"  # timm's fused attention inside vmap: auto (on CUDA only), on, off
    # in-process PBT over the members' weights (Jaderberg et al. 2017), as search=pbt does with Ray trials
    pbt: bool = False
    metric: str = "auto"  # what ranks the members on the validation (rank) split; auto: as checkpoint.monitor
    perturbation_interval: int = 1  # epochs between exploit/explore steps
    quantile_fraction: float = 0.25  # the bottom fraction copies the top fraction (parameters and optimiser state)
    resample_probability: float = 0.25  # resample a raw weight instead of perturbing it (x 0.8 or x 1.2)
    weight_low: float = 0.05  # raw weights are resampled within [weight_low, 1]
    pbt_seed: int = 0


@dataclass
class MergingConfig:
    """A multi-task model made by merging task models (`mtl_lightning/merging`): off while `name` is null. A joint
    warm-up (uniform weights) makes the start theta_0; one model per task fine-tunes from it; the method merges their
    shared parameters, each task keeps its own model's head, and the method's coefficients are chosen on validation."""

    name: str | None = None  # average | task_arithmetic | ties | dare
    warmup_epochs: int = 1  # the joint training that makes theta_0 (merging from a random start fails)
    task_epochs: int | None = None  # each task model's fine-tuning; null: trainer.max_epochs
    # with trainer.max_steps (a study's equal budget): the warm-up's share of those steps; the task models share the
    # rest equally, so the run trains exactly trainer.max_steps steps in all, as a joint run of that budget
    warmup_fraction: float = 0.25
    # the runs to merge instead of training them: `start` (theta_0's run) and one single-task run per task, each
    # started from it (model.init), such as the warm-up and task models of an earlier merging run
    start: str | None = None
    models: list[str] = field(default_factory=list)
    # task_arithmetic, ties, dare: the scaling coefficients tried; null: the method's
    lambdas: list[float] | None = None
    keeps: list[float] | None = None  # ties (and dare over it): the fractions of each task vector kept; null: [0.2]
    p: float = 0.9  # dare: the drop rate
    base: str = "task_arithmetic"  # dare: the method that merges the sparse task vectors
    dare_seed: int = 0  # dare: its draws
    granularity: str = "layer"  # adamerging: a coefficient per task and parameter tensor (layer) or per task (task)
    ada_init: float = 0.3  # adamerging: the coefficients' start
    ada_lr: float = 1e-3  # adamerging: Adam's step on the coefficients
    ada_steps: int = 500  # adamerging: Adam steps, one validation batch (inputs only) each
    # train the task models at once, one Ray task each (a local Ray, or the cluster at RAY_ADDRESS, whose nodes must
    # share out_dir's storage); a run's own callbacks do not reach them
    parallel: bool = False
    cpus_per_model: float = 1.0  # merging.parallel: CPUs Ray reserves for each task model
    gpus_per_model: float = -1.0  # merging.parallel: GPUs for each (fractions share one); -1: 1 with CUDA, else 0


@dataclass
class Config:
    exp: str = "default"
    seed: int = 0
    out_dir: str = "runs"  # runs go to <out_dir>/<exp>/<run_name>/
    run_name: str | None = None  # default: a timestamp
    resume: str | None = None  # a checkpoint path, or "last": the newest run of this experiment
    logger: str = "csv"  # comma-separated: csv, tensorboard, wandb, none
    test: bool = True  # evaluate the final model on the test split
    grad_cos_every: int = 0  # log the task gradients' pairwise cosines every N steps (K backward passes; 0: off)
    plugins: list[str] = field(default_factory=list)  # modules or .py files to import first (mtl_lightning/plugins.py)
    data: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    weighting: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    delta_m: DeltaMConfig = field(default_factory=DeltaMConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    merging: MergingConfig = field(default_factory=MergingConfig)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"
SHORTHANDS = ("data", "weighting", "merging")  # `weighting=fixed` means `weighting.name=fixed`


def list_experiments(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in Path(config_dir).glob("*.yaml"))


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    items = []
    for o in overrides:
        if "=" not in o:
            raise MTLError(f"Override {o!r} is not of the form key=value (e.g. trainer.max_epochs=3).")
        key, value = o.split("=", 1)
        items.append(f"{key}.name={value}" if key in SHORTHANDS else o)
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise MTLError(f"Could not parse the overrides {list(overrides)}: {e}") from None


def _merge(schema: DictConfig, delta: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, delta)
    except ConfigKeyError as e:
        parent = e.full_key.rpartition(".")[0]
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else "none"
        where = f" under '{parent}'" if parent else ""
        raise MTLError(f"Unknown config key '{e.full_key}' (from {source}). Valid keys{where}: {valid}.") from None
    except ValidationError as e:
        msg = str(e).splitlines()[0]
        raise MTLError(f"Bad value for config key '{e.full_key}' (from {source}): {msg}.") from None
    except OmegaConfBaseException as e:
        raise MTLError(f"Bad config (from {source}): {str(e).splitlines()[0]}") from None


def compose(exp: str, overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The base config, then `<config_dir>/<exp>.yaml`, then the `key=value` overrides."""
    names = list_experiments(config_dir)
    if exp not in names:
        raise MTLError(f"Unknown experiment exp={exp!r}. Valid choices: {', '.join(names)}.")
    path = Path(config_dir) / f"{exp}.yaml"
    delta = OmegaConf.load(path) or OmegaConf.create({})
    cli = _parse_overrides(overrides)
    # plugins first: what they register is then selectable and typed like a built-in (a resumed run's, too)
    for src in (cli, delta):  # `plugins=a.py`, one path without brackets, is a list of one (and types as one)
        if isinstance(src.get("plugins"), str):
            src.plugins = [src.plugins]
    given = load_plugins([*(delta.get("plugins") or []), *(cli.get("plugins") or [])])
    plugins = list(dict.fromkeys([*given, *_recorded_plugins(exp, cli, delta)]))

    def chosen(section: str, default: str) -> str:
        for src in (cli, delta):
            v = OmegaConf.select(src, f"{section}.name")
            if v is not None:
                return str(v)
        return default

    weighting = chosen("weighting", "uniform")
    if "weighting" in delta and weighting != str(OmegaConf.select(delta, "weighting.name") or "uniform"):
        # the experiment's weighting options belong to its own method: another one starts from its defaults
        # (exp=domainnet_forkmerge weighting=uniform is joint training, not an error about weighting.target)
        delta = OmegaConf.masked_copy(delta, [k for k in delta if k != "weighting"])
    data = chosen("data", "digits")
    if "data" in delta and data != str(OmegaConf.select(delta, "data.name") or "digits"):
        # likewise a dataset's own keys (digits' data.mode) belong to it; the keys every mixture has stay
        common = {f.name for f in fields(DataConfig)} - {"name"}
        kept = {k: v for k, v in delta.data.items() if k in common}
        delta = OmegaConf.merge(OmegaConf.masked_copy(delta, [k for k in delta if k != "data"]), {"data": kept})
    delta = _vit_shape_for(cli, delta)
    for src, where in ((delta, f"experiment file {path}"), (cli, "the command line")):
        _check_nested_lists(src, where)
    schema = _schema(data, weighting)
    cfg = _merge(schema, delta, f"experiment file {path}")
    cfg = _merge(cfg, cli, "the command line")
    cfg.exp, cfg.plugins = exp, plugins
    return cfg


def _recorded_plugins(exp: str, cli: DictConfig, delta: DictConfig) -> list[str]:
    """The plugins a resumed run was trained with (its config.yaml records them), imported; a missing one is named
    with where it was."""
    resume = cli.get("resume")
    if not resume:
        return []
    from .runs import find_run

    out_dir = cli.get("out_dir") or delta.get("out_dir") or Config.out_dir
    run_dir, _ = find_run(Path(out_dir).expanduser().resolve() / exp, str(resume), cli.get("run_name"))
    saved = run_dir / "config.yaml" if run_dir else None
    if saved is None or not saved.is_file():
        return []
    recorded = list(OmegaConf.load(saved).get("plugins") or [])
    for spec in recorded:
        try:
            load_plugins([spec])
        except MTLError as e:
            raise MTLError(
                f"The run {run_dir} was trained with the plugin {spec} (its config.yaml records it), which cannot be "
                f"imported now: {e} Put it back where it was (or install it), then resume."
            ) from None
    return recorded


VIT_SHAPE = ("depth", "width", "num_heads", "patch_size", "mlp_ratio")  # model keys that shape a ViT only
NESTED = {"population.weights": "one weight vector per member, e.g. population.weights=[[0.5,0.5],[0.9,0.1]]"}


def _vit_shape_for(cli: DictConfig, delta: DictConfig) -> DictConfig:
    """The experiment's ViT shape keys dropped when the command line picks a timm backbone that is not a ViT (and
    does not set them itself): they shaped the experiment's ViT, not the backbone asked for."""
    backbone = OmegaConf.select(cli, "model.backbone")
    if backbone is None or "model" not in delta:
        return delta
    import timm

    from .network import is_vit

    if not timm.is_model(backbone) or is_vit(backbone):
        return delta
    given = OmegaConf.select(cli, "model") or {}
    model = {k: v for k, v in delta.model.items() if k not in VIT_SHAPE or k in given}
    return OmegaConf.merge(OmegaConf.masked_copy(delta, [k for k in delta if k != "model"]), {"model": model})


def _check_nested_lists(src: DictConfig, where: str) -> None:
    """A flat list where a list of lists belongs, named with the key (OmegaConf names only the list's index)."""
    for key, shape in NESTED.items():
        value = OmegaConf.select(src, key)
        if OmegaConf.is_list(value) and not all(OmegaConf.is_list(v) for v in value):
            raise MTLError(f"{key}={OmegaConf.to_container(value)} (from {where}) must be {shape}.")


def _schema(data: str, weighting: str) -> DictConfig:
    """The typed base with the `data` and `weighting` sections of the named mixture and method (struct mode)."""
    return _typed_base(DATASETS.get(data).Config, WEIGHTINGS.get(weighting).Config)


@functools.lru_cache(maxsize=256)
def _typed_base(data_config: type, weighting_config: type) -> DictConfig:
    # keyed by the classes, so a plugin that registers a name again gets its own. Building a structured config is
    # two thirds of a compose (a study checks every cell's); callers never change it: OmegaConf.merge copies its first
    # argument, and every use goes through _merge or reads it
    schema = OmegaConf.structured(Config(data=data_config(), weighting=weighting_config()))
    OmegaConf.set_struct(schema, True)
    for free in (schema.model.kwargs, schema.delta_m.base):  # open-ended maps: any key is valid there
        OmegaConf.set_struct(free, False)
    return schema


def config_from_dict(values: dict, source: str) -> DictConfig:
    """A resolved config saved as a plain dict (a checkpoint's hyperparameters), typed again by the base config,
    its plugins imported first."""
    load_plugins(values.get("plugins"))
    schema = _schema(values["data"]["name"], values["weighting"]["name"])
    return _merge(schema, OmegaConf.create(values), source)


def with_weighting(cfg: DictConfig, weighting: dict, **changes) -> DictConfig:
    """`cfg` with its weighting replaced by `weighting` (a dict with `name`) and top-level `changes` applied."""
    rest = OmegaConf.to_container(cfg, resolve=True)
    rest.update(weighting=weighting, **changes)
    return _merge(_schema(cfg.data.name, weighting["name"]), OmegaConf.create(rest), "a derived run")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as {"a.b.c": value}: what two configs are compared by, key by key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def with_overrides(cfg: DictConfig, overrides: Sequence[str], source: str = "the command line") -> DictConfig:
    """`cfg` with `key=value` overrides on top, typed like a composed config's."""
    return _merge(cfg, _parse_overrides(overrides), source)


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config atomically (a crash never leaves a half-written file)."""
    write_atomic(path, OmegaConf.to_yaml(cfg))


def save_run_config(cfg: DictConfig, run_dir: Path, resumed: bool) -> Path:
    """`config.yaml` for a new run. A resumed run keeps its own: the resuming command's config goes beside it, as
    `config.resume-<n>.yaml`, headed by the keys it changed."""
    path = run_dir / "config.yaml"
    if not (resumed and path.exists()):
        save_config(cfg, path)
        return path
    n = 1
    while (run_dir / f"config.resume-{n}.yaml").exists():
        n += 1
    old = flatten(OmegaConf.to_container(OmegaConf.load(path)))
    new = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    ]
    head = "".join(f"#   {c}\n" for c in changed) or "#   (none)\n"
    path = run_dir / f"config.resume-{n}.yaml"
    write_atomic(path, f"# Resumed from config.yaml; the keys this command changed:\n{head}" + OmegaConf.to_yaml(cfg))
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
