"""The reports shipped in reproduction/ rebuild, byte for byte, from what is shipped beside them (meta.json and the
cells' records), with the documented command."""

import shutil
from pathlib import Path

import pytest

from experiments.study import main

SHIPPED = Path(__file__).resolve().parents[1] / "reproduction"


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.iterdir() if (p / "report.md").exists()))
def test_every_shipped_report_rebuilds_from_what_is_shipped(name, tmp_path):
    copy = tmp_path / name
    shutil.copytree(SHIPPED / name, copy, ignore=shutil.ignore_patterns("tune", "searches"))
    for made in ("report.md", "results.csv"):
        (copy / made).unlink()
    assert main(["--report", str(copy)]) == 0
    for made in ("report.md", "results.csv"):
        assert (copy / made).read_text() == (SHIPPED / name / made).read_text(), made
    assert "Command: `python -m experiments.study " in (copy / "report.md").read_text()
