"""Train one experiment: `python -m experiments.run exp=digits_mtl [key=value ...]`.

`python -m experiments.run --list [plugins=[...]]` lists the experiments and what can be chosen by name (weightings,
datasets, architectures; plugins' entries marked with where they come from); `--help` prints this text;
`--print-config` prints the resolved configuration before training (it is always written to the run's config.yaml);
`--check` runs every check a run makes before it starts (the config's keys and values, the data, the weighting, the
network, the checkpoint to resume or start from) and stops there: nothing is written, nothing trains.
"""

from __future__ import annotations

import sys

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mtl_lightning.config import compose, list_experiments
from mtl_lightning.errors import MTLError
from mtl_lightning.train import train


def print_table(metrics: dict) -> None:
    """Every task's metrics on val (and test), one row each: what a training run and an evaluation print."""
    names = [k[4:] for k in metrics if k.startswith("val/") and not k.startswith("val/loss/")]
    names += [k[5:] for k in metrics if k.startswith("test/") and f"val/{k[5:]}" not in metrics and "/loss/" not in k]
    width = max([len(n) for n in names] + [16]) + 2
    shown = {k: f"{v:.4f}" for k, v in metrics.items() if isinstance(v, float)}
    col = max([len(s) for s in shown.values()] + [8]) + 2  # QM9's meV MAEs above 10^4 ran into each other at 10
    print(f"\n{'metric':<{width}}{'val':>{col}}{'test':>{col}}")
    for n in names:
        cells = "".join(f"{shown.get(f'{s}/{n}', ''):>{col}}" for s in ("val", "test"))
        print(f"{n:<{width}}{cells}")


def run(cfg: DictConfig, callbacks=(), show_config: bool = False, check: bool = False) -> dict:
    """Train `cfg` and print every task's metrics on val and test; returns the metrics (and `run_dir`).
    `show_config` prints the resolved config once every check has passed (so an error is the only output); `check`
    stops there (`--check`) and returns the run's one-line summary."""
    announce = (lambda c: print(OmegaConf.to_yaml(c))) if show_config and not rank_zero_only.rank else None
    if check:
        if cfg.merging.name:
            from mtl_lightning.merging.run import check_merging

            check_merging(cfg)
        out = train(cfg, callbacks, announce=announce, check_only=True)
        print(f"{out['summary']}\ncheck passed: nothing written, nothing trained")
        return out
    if cfg.merging.name:  # task models merged into one (mtl_lightning/merging/run.py)
        from mtl_lightning.merging.run import merge_run

        metrics = merge_run(cfg, fit=lambda c: train(c, callbacks))
    else:
        metrics = train(cfg, callbacks, announce=announce)
    if rank_zero_only.rank:  # a DDP worker: rank 0 prints the one report
        return metrics
    print_table(metrics)
    print(f"outputs: {metrics['run_dir']}")
    return metrics


def listing(plugins) -> str:
    """The experiments, then every name a config can choose, a plugin's marked with where it comes from."""
    import timm

    from mtl_lightning.architectures import ARCHITECTURES
    from mtl_lightning.data import DATASETS
    from mtl_lightning.plugins import load_plugins, origin
    from mtl_lightning.registry import where
    from mtl_lightning.weighting import WEIGHTINGS

    load_plugins(plugins)
    out = ["experiments (exp=NAME):", *(f"  {e}" for e in list_experiments())]
    for title, key, registry in (
        ("weightings", "weighting", WEIGHTINGS),
        ("datasets", "data", DATASETS),
        ("architectures", "model.architecture", ARCHITECTURES),
    ):
        out.append(f"{title} ({key}=NAME):")
        for name, cls in registry.items():
            mark = where(cls) if origin(cls.__module__) else ""
            out.append(f"  {name:<16}{mark}".rstrip())
    mine = [(n, origin(timm.models.model_entrypoint(n).__module__)) for n in timm.list_models()]
    mine = [(n, o) for n, o in mine if o and not o.startswith("module timm")]
    if mine:
        out.append("backbones from plugins (model.backbone=NAME; every timm model name works too):")
        out += [f"  {n:<16}{o}" for n, o in mine]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        if "--list" in argv or "exp=list" in argv:
            plugins = OmegaConf.from_dotlist([a for a in argv if a.startswith("plugins=")]).get("plugins") or []
            print(listing(plugins))  # load_plugins takes one path without brackets too
            return 0
        exps = [a.split("=", 1)[1] for a in argv if a.startswith("exp=")]
        if len(exps) != 1:
            raise MTLError(f"give exactly one exp=NAME. Experiments: {', '.join(list_experiments())}.")
        cfg = compose(exps[0], [a for a in argv if not a.startswith(("exp=", "--"))])
        unknown = [a for a in argv if a.startswith("--") and a not in ("--print-config", "--check")]
        if unknown:
            raise MTLError(f"unknown option {unknown[0]}. Options: --list, --print-config, --check, --help.")
        run(cfg, show_config="--print-config" in argv, check="--check" in argv)
    except MTLError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
