"""The documentation site builds with --strict (a broken link, a missing page or a docstring reference that no
longer resolves fails), and its generated reference lists every registered name, so that a new weighting, mixture,
experiment or study appears on the site without editing it."""

import logging
from pathlib import Path

from mkdocs.commands.build import build
from mkdocs.config import load_config

from mtl_lightning.architectures import ARCHITECTURES
from mtl_lightning.config import list_experiments
from mtl_lightning.data import DATASETS
from mtl_lightning.search.study import study_files
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
    assert "weighting.inner_steps" in page["weightings"] and "LibMTL" in page["weightings"]
    assert "cityscapes/train/image/0.npy" in page["datasets"]  # where a dataset's files go, from its loader
    assert "LabelledTensors" in page["api"] and "Weighting" in page["api"]
    assert "fonts.googleapis" not in (tmp_path / "site" / "index.html").read_text()  # offline: no web fonts
