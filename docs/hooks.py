"""mkdocs hook: the reference pages generated from the code at build time, so that they cannot drift from it.

Every config key with its type, default and the comment beside it in the dataclass (the typed base, every mixture's
and every weighting's options, `search.*`, a study's keys), and the lists of experiments, studies, weightings,
mixtures and architectures from their registries. The pages are added to the build (nothing is written to docs/).
"""

from __future__ import annotations

import dataclasses
import functools
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


ARXIV = re.compile(r"arXiv[: ]*(\d{4}\.\d{4,5})", re.I)
COST_TABLE = re.compile(r"^\| method \| mode \|((?: K=\d+ time, mem \|)+)$")


def method_costs() -> dict[str, str]:
    """Each method's step time against uniform's, measured side by side in one run, from BENCHMARKS.md's methods
    tables (the first table that has the method: the full 2-40 task sweep, else the one added with it):
    `mode: K=2 1.08x, K=8 1.14x`."""
    costs: dict[str, dict[str, str]] = {}
    ks: list[str] = []
    for line in (ROOT / "BENCHMARKS.md").read_text().splitlines():
        header = COST_TABLE.match(line)
        if header:
            ks = re.findall(r"K=\d+", header.group(1))
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not ks or not line.startswith("| ") or len(cells) != 2 + len(ks):
            ks = ks if line.startswith("|") else []  # a table ends at its first non-table line
            continue
        times = [c.split(",")[0] for c in cells[2:]]
        if all(t.endswith("×") for t in times):
            costs.setdefault(cells[0], {}).setdefault(cells[1], ", ".join(f"{k} {t}" for k, t in zip(ks, times)))
    return {m: "; ".join(f"{mode}: {t}" for mode, t in by_mode.items()) for m, by_mode in costs.items()}


def weightings_page() -> str:
    from mtl_lightning.weighting import WEIGHTINGS

    costs = method_costs()
    out = [
        "# Weightings\n",
        "Every registered method (`weighting=NAME`), with its options (`weighting.KEY=VALUE`), generated from the "
        "registry: the paper and the reference implementation each follows are in its description. The step time "
        "is against uniform's at K tasks, measured side by side in one run (`benchmarks/methods.py`, "
        "[Benchmarks](../benchmarks.md)); a method without one has not been measured.\n",
        "| name | kind | paper | step time vs uniform |",
        "|---|---|---|---|",
    ]
    for name, cls in builtin(WEIGHTINGS):
        kind = "gradient" if getattr(cls, "gradient_based", False) else "loss"
        paper = ARXIV.search((cls.__doc__ or "") + (inspect.getmodule(cls).__doc__ or ""))
        link = f"[arXiv:{paper.group(1)}](https://arxiv.org/abs/{paper.group(1)})" if paper else ""
        out.append(f"| [`{name}`](#{name}) | {kind} | {link} | {esc(costs.get(name, ''))} |")
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


def dataset_modules() -> dict:
    """Loader module -> its registered mixtures, in registry order: one page per dataset module."""
    from mtl_lightning.data import DATASETS

    modules: dict = {}
    for name, cls in builtin(DATASETS):
        modules.setdefault(inspect.getmodule(cls), []).append((name, cls))
    return modules


def missing_message(name: str, exps: list[str]) -> str | None:
    """What a run prints when the dataset is not under data.root (the loader's own message, produced here)."""
    from mtl_lightning.config import compose
    from mtl_lightning.data import create_datamodule
    from mtl_lightning.errors import MTLError

    cfg = compose(exps[0] if exps else "digits_mtl", [*([] if exps else [f"data={name}"]), "data.root=/path/to/data"])
    try:
        create_datamodule(cfg.data).check()
    except MTLError as e:
        return str(e)
    return None


@functools.cache
def experiment_data() -> dict[str, str]:
    """exp -> the mixture it trains on."""
    from mtl_lightning.config import compose, list_experiments

    return {e: compose(e).data.name for e in list_experiments()}


def dataset_page(module, entries) -> str:
    names = [n for n, _ in entries]
    out = [f"# {', '.join(names)}\n", inspect.cleandoc(module.__doc__ or "") + "\n"]
    for name, cls in entries:
        exps = [e for e, data in experiment_data().items() if data == name]
        out.append(f"## `data={name}`\n")
        if isinstance(getattr(cls, "source", None), str) and cls.source:
            out.append(f"Where to get it: {cls.source}\n")
        if exps:
            out.append("Experiments: " + ", ".join(f"`{e}`" for e in exps) + "\n")
        out.append(options_table(cls.Config, "data.", skip=("name",)))
        if "root" in {f.name for f in dataclasses.fields(cls.Config)}:
            message = missing_message(name, exps)
            if message:
                out += ["When its files are not there, a run stops before anything is written with:\n"]
                out += ["```text", textwrap.fill(f"error: {message}", 110), "```\n"]
    return "\n".join(out) + "\n"


def dataset_slug(module) -> str:
    return f"datasets/{module.__name__.rsplit('.', 1)[-1]}.md"


def datasets_page() -> str:
    out = [
        "# Datasets\n",
        "Every dataset module, one page each: where the data comes from, the exact files and arrays it reads under "
        "`data.root`, its splits, its options, and the message a run prints when it is missing. Each page is the "
        "loader's own description, generated from the code. How to choose and mix them: the "
        "[Datasets guide](../guide/datasets.md).\n",
        "| page | mixtures | |",
        "|---|---|---|",
    ]
    for module, entries in dataset_modules().items():
        short, names = module.__name__.rsplit(".", 1)[-1], ", ".join(f"`{n}`" for n, _ in entries)
        out.append(f"| [{short}](../{dataset_slug(module)}) | {names} | {esc(first_paragraph(module.__doc__))} |")
    return "\n".join(out) + "\n"


LINK = re.compile(r"\[([^\]]+)\]\((?!https?:|#)([^)]+)\)")


def from_root(name: str, title: str) -> str:
    """A file of the repository's root (REPRODUCTION.md, BENCHMARKS.md) as a page: its links into the repository
    become plain text (the site holds only the docs)."""
    text = (ROOT / name).read_text()
    text = LINK.sub(lambda m: m.group(1) if m.group(1).startswith("`") else f"{m.group(1)} (`{m.group(2)}`)", text)
    return text if text.startswith("# ") else f"# {title}\n\n{text}"


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


def _message(make) -> str:
    """The one paragraph a mistake produces, produced here by making it."""
    from mtl_lightning.errors import MTLError

    try:
        make()
    except MTLError as e:
        return textwrap.fill(f"error: {e}", 110)
    raise AssertionError(f"{make} raised nothing: the troubleshooting page shows a message that no longer exists")


def _zero_steps():
    from mtl_lightning.config import compose
    from mtl_lightning.data import create_datamodule

    create_datamodule(compose("synthetic_recsys", ["data.batch_size=65536", "data.drop_last=true"]).data).check_epoch(1)


def _weights():
    from mtl_lightning.config import compose
    from mtl_lightning.weighting import create_weighting

    cfg = compose("digits_mtl", ["weighting=fixed", "weighting.weights=[1,2,3]"])
    create_weighting(["left", "right"], cfg.weighting)


def _resume():
    from mtl_lightning.config import compose
    from mtl_lightning.runs import resolve_run

    resolve_run(compose("digits_mtl", ["resume=last", "out_dir=/path/to/nowhere"]))


# (the mistake, its cause and fix, a function that makes it): the messages on the page are the code's own
TROUBLES = [
    (
        "A mistyped key",
        "A key the typed config does not have (here `weighting.weigths`). The message lists the "
        "valid keys of that section; `--check` finds it without training.",
        lambda: __import__("mtl_lightning.config").config.compose("digits_mtl", ["weighting.weigths=[1,2]"]),
    ),
    (
        "An unknown weighting, mixture or experiment",
        "A name no registry has. `python -m experiments.run --list` "
        "lists every name; a plugin's names need `plugins=[...]` on the command line.",
        lambda: __import__("mtl_lightning.config").config.compose("digits_mtl", ["weighting=pcgard"]),
    ),
    (
        "Weights of the wrong length or sign",
        "`weighting.weights` needs one non-negative weight per task, in the order of `data.tasks`.",
        _weights,
    ),
    (
        "A dataset that is not there",
        "`data.root` (default `$MTL_DATA_ROOT`, else `./data`) does not hold the "
        "files. Each dataset's page says what to download and where; point `data.root` at the folder above the "
        "dataset's own.",
        lambda: (
            __import__("mtl_lightning.data")
            .data.create_datamodule(
                __import__("mtl_lightning.config").config.compose("nyuv2_mtl", ["data.root=/path/to/data"]).data
            )
            .check()
        ),
    ),
    (
        "An epoch with no training step",
        "A split smaller than the batch with `data.drop_last=true` (or "
        "`trainer.limit_train_batches=0`): the run would succeed without training. Lower `data.batch_size` or set "
        "`data.drop_last=false`.",
        _zero_steps,
    ),
    (
        "Nothing to resume",
        "`resume=last` looks for the newest run of the experiment under `out_dir` (or the run "
        "`run_name` names). Check `out_dir`, or start a new run without `resume`.",
        _resume,
    ),
]


def troubleshooting_page() -> str:
    out = [
        "# Troubleshooting\n",
        "The mistakes users make most, each with its cause, its fix and the message it prints (produced by the code "
        "when this page is built, so it is the message you will see). Every such message is one paragraph on "
        "stderr with exit code 2 and no traceback; `python -m experiments.run ... --check` runs every check of a "
        "command without training.\n",
    ]
    for title, text, make in TROUBLES:
        out += [f"## {title}\n", text + "\n", "```text", _message(make), "```\n"]
    out += [
        "## A NaN loss\n",
        "A task's loss became NaN or infinite: the run stops at that step, names the task (or the weighting, when "
        "its weights are not finite) and keeps the last good checkpoint. Lower `optim.lr`, set "
        "`trainer.gradient_clip_val`, or check the task's targets (NaN depth, class ids out of range: those are "
        "named with the file they came from).\n",
        "## A resumed run refused\n",
        "`resume` composes the config from the command line again: repeat every override the run started with "
        "(`weighting=NAME` and its options, `data.*`, `model.*`). A checkpoint whose tasks, backbone or heads "
        "differ is refused, naming the difference; a different option of the method is taken as given and written "
        "to `config.resume-<n>.yaml`.\n",
        "## Ray\n",
        "A search or study prints each failed trial's first error line and keeps its logs in the trial's run "
        "directory (`console.log`). With `RAY_ADDRESS` set, `search.storage_path` must be on storage every node "
        "shares. `search.max_failures=N` retries a crashed trial from its last checkpoint; `resume=true` continues "
        "an interrupted search or study.\n",
    ]
    return "\n".join(out)


PAGES = {
    "reproduction.md": lambda: from_root("REPRODUCTION.md", "Reproduction"),
    "benchmarks.md": lambda: from_root("BENCHMARKS.md", "Benchmarks"),
    "guide/troubleshooting.md": troubleshooting_page,
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
    for module, entries in dataset_modules().items():
        files.append(File.generated(config, dataset_slug(module), content=dataset_page(module, entries)))
    return files


def on_config(config):
    """The dataset pages join the navigation under "Dataset pages", in registry order."""
    pages = [{m.__name__.rsplit(".", 1)[-1]: dataset_slug(m)} for m in dataset_modules()]
    for section in config.nav:
        if isinstance(section, dict) and "Dataset pages" in section:
            section["Dataset pages"] = [{"All datasets": "reference/datasets.md"}, *pages]
    return config
