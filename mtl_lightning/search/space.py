"""Search spaces over any config key (`search.space`): a method's own options, the optimiser's, the model's.

    search.space:
      optim.lr: loguniform(1e-4, 1e-2)
      weighting.c: uniform(0.1, 0.9)             # CAGrad's c
      optim.weight_decay: [0, 1.0e-5, 1.0e-4]    # a list: a choice

On the command line, `search.space.optim.lr='loguniform(1e-4,1e-2)'` (nested keys are read as dotted ones). Every key
is checked against the composed config before a trial starts: an unknown key, or one the chosen weighting does not
have, names the valid keys of its section; a bad distribution names the valid forms. A trial applies its values as
overrides (`config["params"]`), so a key means in a trial what it means on the command line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from omegaconf import OmegaConf

from ..config import compose, flatten
from ..errors import MTLError

FORMS = {  # name -> its arguments
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "randint": ("low", "high"),  # integers low..high, both included
    "quniform": ("low", "high", "q"),
}
VALID_FORMS = ", ".join(f"{n}({', '.join(a)})" for n, a in FORMS.items()) + ", or a list of choices"


@dataclass(frozen=True)
class Dist:
    """One key's distribution: a form of FORMS with its arguments, or `choice` with its values."""

    form: str
    args: tuple

    def tune(self):
        from ray import tune

        if self.form == "choice":
            return tune.choice(list(self.args))
        if self.form == "randint":
            return tune.randint(int(self.args[0]), int(self.args[1]) + 1)  # Tune's upper bound is exclusive
        return getattr(tune, self.form)(*self.args)

    def bounds(self) -> list[float] | None:
        """[low, high] for PB2 (a continuous range); None for a choice."""
        return None if self.form == "choice" else [float(self.args[0]), float(self.args[1])]

    def examples(self) -> list:
        """The values a check composes: every choice, or both ends of a range."""
        if self.form == "choice":
            return list(self.args)
        low, high = self.args[:2]
        return [int(low), int(high)] if self.form == "randint" else [low, high]

    def __str__(self) -> str:
        return f"{self.form}({', '.join(map(str, self.args))})" if self.form != "choice" else str(list(self.args))


def parse(key: str, spec) -> Dist:
    """A distribution from its YAML or command-line form."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise MTLError(f"search.space.{key} is an empty list: give the choices, or {VALID_FORMS}.")
        return Dist("choice", tuple(spec))
    m = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", str(spec))
    if not m or m.group(1) not in FORMS:
        hint = ""
        if "(" in str(spec) and ")" not in str(spec):  # YAML's flow style `{k: uniform(0.1, 0.9)}` splits at the comma
            hint = ' (inside a YAML `{...}` mapping, quote it: "uniform(0.1, 0.9)")'
        raise MTLError(f"search.space.{key}={spec!r} is not a distribution{hint}. Valid forms: {VALID_FORMS}.")
    name, names = m.group(1), FORMS[m.group(1)]
    try:
        args = tuple(float(a) for a in m.group(2).split(","))
    except ValueError:
        raise MTLError(f"search.space.{key}={spec!r}: {name} takes numbers ({', '.join(names)}).") from None
    if len(args) != len(names):
        raise MTLError(f"search.space.{key}={spec!r}: {name} takes {len(names)} numbers ({', '.join(names)}).")
    low, high = args[:2]
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or (name == "loguniform" and low <= 0):
        need = "0 < low < high" if name == "loguniform" else "low < high"
        raise MTLError(f"search.space.{key}={spec!r}: {name} needs {need}.")
    return Dist(name, args)


def flat_space(space) -> dict:
    """The space's keys as dotted keys (a nested `optim: {lr: ...}` from the command line is `optim.lr`)."""
    space = OmegaConf.to_container(space) if OmegaConf.is_config(space) else dict(space or {})
    out = {}
    for key, value in space.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat_space(value).items()})
        else:
            out[key] = value
    return out


def _fmt(v) -> str:
    return "[" + ",".join(map(_fmt, v)) + "]" if isinstance(v, (list, tuple)) else str(v)


def check_space(space, exp: str, overrides: list[str], where: str = "search.space") -> dict[str, Dist]:
    """Parse every key's distribution and compose the experiment with each key at its examples: a key the config
    does not have (or the chosen weighting does not take), or a value it rejects, fails now, named."""
    dists = {k: parse(k, v) for k, v in flat_space(space).items()}
    if not dists:
        return {}
    cfg = compose(exp, overrides)
    keys = set(flatten(OmegaConf.to_container(cfg, resolve=True)))
    for key, dist in dists.items():
        if key not in keys and not any(k.startswith(key + ".") for k in keys):
            section = key.split(".")[0]
            valid = sorted(k for k in keys if k.split(".")[0] == section) or sorted({k.split(".")[0] for k in keys})
            what = f" with weighting={cfg.weighting.name}" if section == "weighting" else ""
            raise MTLError(f"{where} key {key!r} is not an option of exp={exp}{what}. Valid keys: {', '.join(valid)}.")
        for value in dist.examples():
            try:  # composed and checked as a command-line value is before a run starts (no data loaded)
                check_config(compose(exp, [*overrides, f"{key}={_fmt(value)}"]))
            except MTLError as e:
                raise MTLError(f"{where}.{key}={dist}: the value {value!r} is refused: {e}") from None
    return dists


def check_config(cfg) -> None:
    """What a run checks of its settings before it loads any data: the trainer's, optimiser's and scheduler's
    numbers and names, the data section's options and tasks, the weighting's options."""
    from ..checks import check_settings
    from ..data import create_datamodule
    from ..weighting import create_weighting

    check_settings(cfg)
    create_weighting([t.name for t in create_datamodule(cfg.data, cfg.seed).tasks], cfg.weighting)


def overrides_of(params: dict) -> list[str]:
    """A trial's sampled values as training overrides."""
    return [f"{k}={_fmt(v)}" for k, v in params.items()]
