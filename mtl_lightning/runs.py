"""Run folders: where a run's outputs go, which checkpoint a resume continues, whether that checkpoint is this
config's model, and clearing the folder of a run that failed before training anything."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import MTLError


def find_run(exp_dir: Path, resume: str | None, run_name: str | None) -> tuple[Path | None, Path | None]:
    """The run folder and checkpoint that `resume` (last, or a .ckpt path) names under `exp_dir`, without writing:
    (None, None) for a fresh run; a checkpoint outside a run folder gives (None, ckpt)."""
    if resume == "last":
        if run_name:  # that run, not the newest one
            ckpt = exp_dir / run_name / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                runs = sorted(p.parent.parent.name for p in exp_dir.glob("*/checkpoints/last.ckpt"))
                raise MTLError(
                    f"resume=last run_name={run_name} found no checkpoint {ckpt}. Runs of exp={exp_dir.name} that "
                    f"can be resumed: {', '.join(runs) or 'none'}."
                )
            return ckpt.parent.parent, ckpt
        found = sorted(exp_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise MTLError(
                f"resume=last found no checkpoint {exp_dir}/*/checkpoints/last.ckpt. Start a new run "
                "without `resume`, or give resume=PATH/TO/FILE.ckpt."
            )
        return found[-1].parent.parent, found[-1]
    if resume:
        ckpt = Path(resume).expanduser().resolve()
        if not ckpt.is_file():
            raise MTLError(f"resume={resume} is not a checkpoint file. Give a .ckpt path or resume=last.")
        if ckpt.parent.name == "checkpoints":
            run_dir = ckpt.parent.parent
            if run_name and run_name != run_dir.name:
                raise MTLError(
                    f"resume={resume} continues the run {run_dir}, but run_name={run_name} names another: "
                    "drop run_name, or resume that run with resume=last run_name=NAME."
                )
            return run_dir, ckpt
        return None, ckpt
    return None, None


def resolve_run(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a fresh run). Writes nothing: the directory of
    a new run is made once every check has passed (`make_run_dir`)."""
    exp_dir = Path(cfg.out_dir).expanduser().resolve() / cfg.exp
    run_dir, ckpt = find_run(exp_dir, cfg.resume, cfg.run_name)
    return run_dir or _new_run_dir(exp_dir, cfg.run_name), ckpt


def _new_run_dir(exp_dir: Path, run_name: str | None) -> Path:
    if run_name:
        run_dir = exp_dir / run_name
        if any((run_dir / "checkpoints").glob("*.ckpt")):  # never overwrite a trained run
            raise MTLError(
                f"{run_dir} already holds checkpoints. Continue it with resume=last run_name={run_name} (or resume="
                f"{run_dir}/checkpoints/last.ckpt), or choose another run_name."
            )
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, i = exp_dir / stamp, 1
    while run_dir.exists():
        run_dir, i = exp_dir / f"{stamp}-{i}", i + 1
    return run_dir


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MTLError(
            f"Cannot write to the output directory {run_dir} ({e.strerror}). Choose a writable one with out_dir=PATH."
        ) from None


ARCHITECTURE = ("backbone", "depth", "width", "num_heads", "patch_size", "mlp_ratio", "kwargs")


def check_resumable(ckpt: Path, model, cfg: DictConfig, key: str = "resume=", instead: str = "a new run") -> None:
    """Refuse, naming the difference, a checkpoint whose tasks, heads, backbone or weighting state are not this
    config's model: Lightning would fail half-way with a state-dict traceback after the run folder was touched.
    `key` names the checkpoint in the message (resume=, or evaluate's "the checkpoint "); `instead`: what else to do."""
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        hp, state = saved.get("hyper_parameters") or {}, saved["state_dict"]
    except Exception as e:
        raise MTLError(f"{key}{ckpt} is not a readable Lightning checkpoint ({type(e).__name__}: {e}).") from None
    # img_size only where the data has one: graphs, tabular and dense mixtures have none (a resume read it blindly)
    here = {
        "data.name": cfg.data.name,
        "tasks": [t.name for t in model.tasks],
        "data.img_size": cfg.data.get("img_size"),
    }
    here.update({f"model.{k}": OmegaConf.to_container(cfg.model, resolve=True)[k] for k in ARCHITECTURE})
    there = {"data.name": (hp.get("data") or {}).get("name"), "tasks": saved.get("tasks")}
    there["data.img_size"] = (hp.get("data") or {}).get("img_size")
    there.update({f"model.{k}": (hp.get("model") or {}).get(k) for k in ARCHITECTURE})
    diffs = [f"{k} {there[k]!r} there, {v!r} here" for k, v in here.items() if there[k] is not None and there[k] != v]
    mine = {k: tuple(getattr(v, "shape", ())) for k, v in model.state_dict().items()}  # (a method's state: a dict)
    theirs = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    trunk = saved.get("frozen_trunk")  # a checkpoint of adapters and heads: its frozen trunk is rebuilt, not held
    if trunk:
        theirs.update({k: mine[k] for k in trunk["keys"] if k in mine})
    if mine != theirs and not diffs:  # an older checkpoint without the names, or a weighting with other state
        odd = sorted(set(mine) ^ set(theirs)) + sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        name = (hp.get("weighting") or {}).get("name")
        if name and name != cfg.weighting.name:
            diffs.append(f"weighting.name {name!r} there, {cfg.weighting.name!r} here")
        diffs.append(f"the parameters {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''} differ")
    if diffs:
        raise MTLError(
            f"{key}{ckpt} was trained with another model than this config builds: {'; '.join(diffs)}. Use it "
            f"with its own settings (its config.yaml: {ckpt.parent.parent / 'config.yaml'}), or {instead}. Nothing "
            "was written."
        )


def trained(run_dir: Path, trainer) -> bool:
    """Whether a run holds anything trained: a step taken, a checkpoint, or ForkMerge's pruning results."""
    stepped = trainer is not None and trainer.global_step > 0
    return stepped or any(run_dir.rglob("*.ckpt")) or (run_dir / "pruning.json").exists()


def remove_untrained(run_dir: Path, trainer) -> None:
    """A new run that failed before training anything leaves no folder behind."""
    if not trained(run_dir, trainer):
        shutil.rmtree(run_dir, ignore_errors=True)
