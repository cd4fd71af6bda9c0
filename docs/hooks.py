"""mkdocs hook: the reference pages generated from the code at build time, so that they cannot drift from it.

Every config key with its type, default and the comment beside it in the dataclass (the typed base, every mixture's
and every weighting's options, `search.*`, a study's keys), and the lists of experiments, studies, weightings,
mixtures and architectures from their registries. The pages are added to the build (nothing is written to docs/).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FIELD = re.compile(r"^    (\w+): [^=#]+?(?:= (?P<default>[^#]*?))?\s*(?:#\s*(?P<comment>.*))?$")


def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class source: on its line, or the comment lines just above it."""
    out, above = {}, []
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines()[1:]:
        if line.startswith("    #"):  # a comment line at the fields' indentation
            above.append(line.strip().lstrip("# ").strip())
            continue
        m = FIELD.match(line)
        if m:
            out[m.group(1)] = (m.group("comment") or " ".join(above)).strip()
        above = []
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return ""
    return f"`{value!r}`"


def _type(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return esc(f"`{t}`")


def options_table(cls, prefix: str, skip: tuple[str, ...] = ()) -> str:
    """A markdown table of a config dataclass's keys (its base classes' included)."""
    comments = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            comments.update(field_comments(base))
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        rows.append(f"| `{prefix}{f.name}` | {_type(f)} | {esc(_default(f))} | {esc(comments.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


def builtin(registry) -> list:
    """The package's own entries (not a plugin's a process has loaded)."""
    return [(n, c) for n, c in registry.items() if c.__module__.startswith("mtl_lightning.")]


def esc(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def first_paragraph(doc: str | None) -> str:
    text = inspect.cleandoc(doc or "").split("\n\n")[0].replace("\n", " ")
    return "" if re.match(r"^\w+\(.*\)$", text) else text  # a dataclass's generated signature is no description


def config_page() -> str:
    from mtl_lightning.config import Config
    from mtl_lightning.search.config import SearchConfig
    from mtl_lightning.search.study import StudyConfig

    out = [
        "# Configuration reference\n",
        "Every key of the typed base that `python -m experiments.run exp=NAME key=value ...` composes, generated from "
        "the dataclasses in `mtl_lightning/config.py` (a mistyped key fails with the valid ones). The `data` and "
        "`weighting` sections take the keys of the mixture and of the method they name: see "
        "[Mixtures](mixtures.md) and [Weightings](weightings.md).\n",
        "## Top level\n",
        options_table(Config, ""),
    ]
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            doc = first_paragraph(type(default).__doc__)
            out += [f"## `{f.name}.*`\n", doc + "\n", options_table(type(default), f"{f.name}.")]
    out += ["## `search.*` (`python -m experiments.search`)\n", options_table(SearchConfig, "search.")]
    out += ["## A study file's keys (`python -m experiments.study`)\n", options_table(StudyConfig, "")]
    return "\n".join(out)


def weightings_page() -> str:
    from mtl_lightning.weighting import WEIGHTINGS

    out = [
        "# Weightings\n",
        "Every registered method (`weighting=NAME`), with its options (`weighting.KEY=VALUE`), generated from the "
        "registry: the paper and the reference implementation each follows are in its description.\n",
        "| name | kind | class |",
        "|---|---|---|",
    ]
    for name, cls in builtin(WEIGHTINGS):
        kind = "gradient" if getattr(cls, "gradient_based", False) else "loss"
        out.append(f"| [`{name}`](#{name}) | {kind} | `{cls.__module__}.{cls.__name__}` |")
    for name, cls in builtin(WEIGHTINGS):
        out += [f"\n## {name}\n", inspect.cleandoc(cls.__doc__ or "") + "\n"]
        out.append(options_table(cls.Config, "weighting.", skip=("name",)))
    return "\n".join(out)


def mixtures_page() -> str:
    from mtl_lightning.architectures import ARCHITECTURES
    from mtl_lightning.data import DATASETS

    out = ["# Mixtures and architectures\n", "Every registered mixture (`data=NAME`), its keys (`data.KEY=VALUE`).\n"]
    for name, cls in builtin(DATASETS):
        table = options_table(cls.Config, "data.", skip=("name",))
        out += [f"\n## {name}\n", first_paragraph(cls.__doc__) + "\n", table]
    out += ["\n## Architectures (`model.architecture=NAME`)\n", "| name | what it is |", "|---|---|"]
    for name, cls in builtin(ARCHITECTURES):
        out.append(f"| `{name}` | {esc(first_paragraph(cls.__doc__ or inspect.getmodule(cls).__doc__))} |")
    return "\n".join(out) + "\n"


def datasets_page() -> str:
    from mtl_lightning.data import DATASETS

    out = [
        "# Datasets\n",
        "Where each dataset comes from, the exact files and arrays it reads under `data.root`, and its splits: each "
        "loader module's own description. A missing dataset stops a run with one paragraph saying what to download "
        "and where to put it. The options of each are under [Mixtures](mixtures.md).\n",
    ]
    modules: dict = {}
    for name, cls in builtin(DATASETS):
        modules.setdefault(inspect.getmodule(cls), []).append((name, cls))
    for module, entries in modules.items():
        out += [f"\n## {', '.join(f'`{n}`' for n, _ in entries)}\n", inspect.cleandoc(module.__doc__ or "") + "\n"]
        for name, cls in entries:
            if isinstance(getattr(cls, "source", None), str) and cls.source:
                out.append(f"- **`{name}`**, where to get it: {cls.source}")
    return "\n".join(out) + "\n"


def runs_page() -> str:
    from mtl_lightning.config import CONFIG_DIR, list_experiments
    from mtl_lightning.search.study import study_files

    out = ["# Experiments and studies\n", "## Experiments (`python -m experiments.run exp=NAME`)\n"]
    out += ["| exp | what it runs |", "|---|---|"]
    for exp in list_experiments():
        text = (Path(CONFIG_DIR) / f"{exp}.yaml").read_text()
        head = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#")).strip()
        out.append(f"| `{exp}` | {esc(head)} |")
    out += ["\n## Studies (`python -m experiments.study NAME`)\n", "| study | description |", "|---|---|"]
    for name, path in sorted(study_files().items()):
        desc = yaml.safe_load(Path(path).read_text()).get("description", "")
        out.append(f"| `{name}` | {esc(desc)} |")
    return "\n".join(out) + "\n"


PAGES = {
    "reference/config.md": config_page,
    "reference/weightings.md": weightings_page,
    "reference/mixtures.md": mixtures_page,
    "reference/datasets.md": datasets_page,
    "reference/runs.md": runs_page,
}


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, make in PAGES.items():
        files.append(File.generated(config, path, content=make()))
    return files
