"""Train one experiment: `python -m experiments.run exp=digits_mtl [key=value ...]`.

`python -m experiments.run --list` lists the experiments; `--help` prints this text; `--print-config` prints the
resolved configuration before training (it is always written to the run's config.yaml).
"""

from __future__ import annotations

import sys

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mtl_lightning.config import compose, list_experiments
from mtl_lightning.errors import MTLError
from mtl_lightning.train import train


def run(cfg: DictConfig, callbacks=(), show_config: bool = False) -> dict:
    """Train `cfg` and print every task's metrics on val and test; returns the metrics (and `run_dir`).
    `show_config` prints the resolved config once every check has passed (so an error is the only output)."""
    announce = (lambda c: print(OmegaConf.to_yaml(c))) if show_config and not rank_zero_only.rank else None
    metrics = train(cfg, callbacks, announce=announce)
    if rank_zero_only.rank:  # a DDP worker: rank 0 prints the one report
        return metrics
    names = [k[4:] for k in metrics if k.startswith("val/") and not k.startswith("val/loss/")]
    width = max([len(n) for n in names] + [16]) + 2
    print(f"\n{'metric':<{width}}{'val':>10}{'test':>10}")
    for n in names:
        test = metrics.get(f"test/{n}")
        print(f"{n:<{width}}{metrics[f'val/{n}']:>10.4f}{'' if test is None else f'{test:>10.4f}'}")
    print(f"outputs: {metrics['run_dir']}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if "--list" in argv or "exp=list" in argv:
        print("\n".join(list_experiments()))
        return 0
    exps = [a.split("=", 1)[1] for a in argv if a.startswith("exp=")]
    if len(exps) != 1:
        print(
            f"error: give exactly one exp=NAME. Experiments: {', '.join(list_experiments())}.",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = compose(exps[0], [a for a in argv if not a.startswith(("exp=", "--"))])
        run(cfg, show_config="--print-config" in argv)
    except MTLError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
