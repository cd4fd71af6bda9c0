"""The documentation site builds with --strict (a broken link, a missing page or a docstring reference that no
longer resolves fails), and its generated reference lists every registered name, so that a new weighting, mixture,
experiment or study appears on the site without editing it."""

import dataclasses
import logging
import re
import shlex
from pathlib import Path

import pytest
from fixtures import DENSE_WRITERS, GRAPH_WRITERS, LIGHTER, TABULAR_WRITERS, WRITERS, stand_in_start
from mkdocs.commands.build import build
from mkdocs.config import load_config

from experiments.evaluate import main as evaluate_main
from experiments.run import main as run_main
from experiments.run import run
from experiments.search import main as search_main
from experiments.study import main as study_main
from mtl_lightning.architectures import ARCHITECTURES
from mtl_lightning.config import compose, list_experiments
from mtl_lightning.data import DATASETS
from mtl_lightning.search.config import SearchConfig
from mtl_lightning.search.study import load_study, study_files
from mtl_lightning.weighting import WEIGHTINGS

ROOT = Path(__file__).resolve().parents[1]


def own(registry):
    return [n for n, c in registry.items() if c.__module__.startswith("mtl_lightning.")]


def test_the_site_builds_strictly_and_its_reference_lists_every_registered_name(tmp_path, caplog):
    cfg = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        build(cfg)  # strict: a warning aborts the build
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("mkdocs")]
    page = {p.stem: p.read_text() for p in (tmp_path / "site" / "reference").glob("*.html")}
    assert all(f'id="{n}"' in page["weightings"] for n in own(WEIGHTINGS))
    assert all(f'id="{n}"' in page["mixtures"] for n in own(DATASETS))
    assert all(f"<code>{n}</code>" in page["mixtures"] for n in own(ARCHITECTURES))
    assert all(f"<code>{n}</code>" in page["runs"] for n in [*list_experiments(), *study_files()])
    # a key's meaning is the comment beside it in the dataclass: the generated reference carries it
    assert "search.grace_period" in page["config"] and "before it can be stopped" in page["config"]
    assert all(f"<code>search.{f.name}</code>" in page["config"] for f in dataclasses.fields(SearchConfig))
    assert "weighting.inner_steps" in page["weightings"] and "LibMTL" in page["weightings"]
    # a page per dataset module, from its loader: where its files go, and the message when they are missing
    nyuv2 = (tmp_path / "site" / "datasets" / "nyuv2.html").read_text()
    assert "cityscapes/train/image/0.npy" in nyuv2 and "and they are not there" in nyuv2
    assert 'href="../datasets/nyuv2.html"' in page["datasets"]
    assert "arxiv.org/abs/" in page["weightings"]  # each method's paper, from its docstring
    guide = {p.stem: p.read_text() for p in (tmp_path / "site" / "guide").glob("*.html")}
    assert "class LossPower(Weighting)" in guide["extending"].replace("</span>", "").replace('<span class="', "")
    assert "LabelledTensors" in page["api"] and "Weighting" in page["api"]
    assert "fonts.googleapis" not in (tmp_path / "site" / "index.html").read_text()  # offline: no web fonts


# --- every command the site and the README show passes its --check -------------------------------------------------

COMMAND = re.compile(r"python -m experiments\.(run|search|study|evaluate)\b([^`\n]*)")
# keys that name runs on the user's disk (a run to resume, base runs of Δm%, task models to merge): the check of a
# command without them is the same check; --check itself checks them on the user's machine
ON_DISK = ("resume", "delta_m.runs", "merging.start", "merging.models", "model.init")


def documented_commands() -> list[tuple[str, str]]:
    """(module, arguments) of every `python -m experiments.*` in README.md and the hand-written pages."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for module, args in COMMAND.findall(page.read_text().replace("\\\n", " ")):  # continued lines joined
            entry = (module, " ".join(args.split()))
            if entry not in found:
                found.append(entry)
    return found


def argv_of(args: str) -> list[str]:
    """The command's arguments as the shell splits them, less its comment, elisions (...) and on-disk keys."""
    words = shlex.split(args, comments=True)
    return [w for w in words if "..." not in w and w.split("=", 1)[0] not in ON_DISK]


@pytest.fixture(scope="module")
def documented_data(tmp_path_factory):
    """data.name -> a folder with that dataset's tiny fixture, written when a command first needs it."""
    base, made = tmp_path_factory.mktemp("documented"), {}

    def root(name: str) -> Path:
        if name not in made:
            made[name] = base / name
            for write in {**WRITERS, **DENSE_WRITERS, **TABULAR_WRITERS, **GRAPH_WRITERS}[name]:
                write(made[name])
        return made[name]

    return root


@pytest.fixture(scope="module")
def documented_runs(tmp_path_factory):
    """A tiny trained run and a 3-member population, for the evaluate commands' RUN, NAME and POPULATION."""
    out = tmp_path_factory.mktemp("documented_runs")
    tiny = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", f"out_dir={out}"]
    tiny += ["trainer.enable_progress_bar=false", "logger=csv"]
    single = run(compose("digits_mtl", tiny))["run_dir"]
    population = run(compose("digits_mtl", [*tiny, "population.weights=[[1,1],[1,0],[0,1]]"]))["run_dir"]
    return single, population


def extra_overrides(exp: str, argv: list[str], data_root, out_dir: Path) -> list[str]:
    """What a check on this machine adds: its own out_dir, the tiny fixture for a file-backed dataset, no hub."""
    cfg = compose(exp, [a for a in argv if "=" in a and a.split("=")[0].split(".")[0] not in ("exp", "search")])
    extra = [f"out_dir={out_dir}", *LIGHTER.get(exp, [])]  # a smaller network, data that fit the fixture
    if cfg.data.name in {**WRITERS, **DENSE_WRITERS, **TABULAR_WRITERS, **GRAPH_WRITERS}:
        extra += [f"data.root={data_root(cfg.data.name)}", "data.batch_size=2"]
    if cfg.model.pretrained:
        extra.append("model.pretrained=false")  # tests never download
    return extra


@pytest.mark.parametrize("module,args", documented_commands(), ids=lambda v: " ".join(argv_of(v))[:70])
def test_every_documented_command_passes_its_check(
    module, args, documented_data, request, tmp_path, monkeypatch, capsys
):
    """Issue 38: a command on the site or in the README with a mistyped key, an unknown name or a bad value fails
    here. Each is run with --check: composed, its data, weighting and network built (a dataset on disk from its
    tiny fixture), then stopped; evaluate commands load a real run; a study's every cell is planned."""
    monkeypatch.chdir(ROOT)  # plugins=[examples/...] as the pages write them
    argv = argv_of(args)
    if not argv:  # the module named in prose, not a command
        return
    if module == "study" and argv[:1] == ["--report"]:  # a shipped report is rebuilt from what is shipped
        assert argv[1].startswith("runs/") or (ROOT / argv[1] / "meta.json").is_file(), argv
        return
    if "--list" in argv:
        main = {"run": run_main, "study": study_main}[module]
        assert main(argv) == 0
        return
    if module == "evaluate":
        single, population = request.getfixturevalue("documented_runs")  # trained only when a command needs them
        path = population if "member=" in args else single
        keep = [a for a in argv[1:] if not a.startswith("data.root=")]  # the digits are embedded: no root
        assert evaluate_main([path, *keep, "--check"]) == 0, capsys.readouterr().err
        return
    if module == "study":
        start = stand_in_start(load_study(argv[0], [])[0], tmp_path)  # a run the study starts from: on the user's disk
        assert study_main([*argv, *start, "--check"]) == 0, capsys.readouterr().err
        return
    exp = next(a.split("=", 1)[1] for a in argv if a.startswith("exp="))
    if module == "run" and any(a.startswith("data=image_folder") for a in argv):
        argv = [a for a in argv if not a.startswith("data.root=")] + [f"data.root={image_folder(tmp_path)}"]
    extra = extra_overrides(exp, argv, documented_data, tmp_path / "runs")
    main = {"run": run_main, "search": search_main}[module]
    assert main([*argv, *extra, "--check"]) == 0, capsys.readouterr().err
    assert "check passed" in capsys.readouterr().out


def image_folder(tmp_path: Path) -> Path:
    """The layout examples/folder_dataset.py reads, at its smallest: 12 images, two label columns."""
    import csv

    import numpy as np
    from PIL import Image

    root = tmp_path / "my_data"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(root / "images" / f"{i}.png")
        rows.append([f"{i}.png", ("train", "val", "test")[i % 3], i % 3, i % 2])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "split", "shape", "colour"], *rows])
    return root


def test_a_documented_command_with_a_mistyped_key_fails_its_check(capsys):
    """The check the test above relies on fails where it should: a mistyped key, an unknown option."""
    assert run_main(["exp=digits_mtl", "model.dpeth=2", "--check"]) == 2
    assert "model.dpeth" in capsys.readouterr().err
    assert search_main(["exp=digits_mtl", "search=pbt", "search.populaton=2", "--check"]) == 2
    assert "populaton" in capsys.readouterr().err
    assert study_main(["digits_methods", "study.num_cpu=2", "--check"]) == 2
    assert run_main(["exp=digits_mtl", "--chek"]) == 2 and "--chek" in capsys.readouterr().err
    assert [m for m, _ in documented_commands()].count("run") > 20  # the extraction finds the pages' commands


def python_snippets() -> list[tuple[str, str]]:
    """(page, code) of every ```python block written on a page (the included example files are tested as plugins
    by tests/test_extending.py)."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            if "--8<--" not in code:
                found.append((str(page.relative_to(ROOT)), code))
    return found


@pytest.mark.parametrize("page,code", python_snippets(), ids=lambda v: v if v.endswith(".md") else "")
def test_every_python_snippet_on_the_site_runs(page, code):
    exec(compile(code, page, "exec"), {})
