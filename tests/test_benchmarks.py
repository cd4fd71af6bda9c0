"""Every benchmark runs: each command of `make bench`, at its tiny `--smoke` size, so an API change that breaks a
benchmark breaks a test (BENCHMARKS.md's figures must stay reproducible with the commands it prints)."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = ("search.py", "study.py")  # they start Ray: on the "ray" worker, in turn (conftest.py)


def bench_commands() -> list[str]:
    """The `make bench` recipe's commands, as `<script> <args>`."""
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    return [m.group(1).strip() for m in re.finditer(r"\$\(PY\) benchmarks/(.+)", recipe)]


def test_make_bench_runs_every_benchmark_script():
    scripts = {c.split()[0] for c in bench_commands()}
    assert scripts == {p.name for p in (ROOT / "benchmarks").glob("*.py")} - {"gpu.py"}  # gpu.py: make gpu-check


def test_the_gpu_check_runs_at_its_tiny_size_on_a_cpu(tmp_path):
    """benchmarks/gpu.py as a GPU machine would run it, at tiny sizes on the CPU: every section reports its table,
    every step mode matches the CPU run; the PBT section (two Ray searches) is checked as far as its configs."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    argv = [sys.executable, "benchmarks/gpu.py", "--tiny", "--no-compile", f"--out={tmp_path / 'gpu.md'}"]
    argv += ["--sections", "paths", "vit", "population", "methods"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "gpu.md").read_text()
    assert "torch " in text and "CUDA " in text and "skipped" not in text.replace("skipped: --no-compile", ""), text
    assert text.count("| yes |") == 7 and "| NO |" not in text  # every step mode, CPU against the device
    assert re.search(r"\| eager fp16 \| \d+ \|", text) and re.search(r"\| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+×", text)
    assert re.search(r"\| cagrad \| [\d.]+ \| [\d.]+×", text)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu import pbt_searches

    from mtl_lightning.config import compose
    from mtl_lightning.search import compose_search

    for cuda in (False, True):
        for over in pbt_searches(True, cuda).values():
            scfg, rest = compose_search("digits_mtl", over)
            assert scfg.name == "pbt" and scfg.population == 4
            compose("digits_mtl", rest)


@pytest.mark.parametrize(
    "command",
    [pytest.param(c, marks=pytest.mark.xdist_group("ray")) if c.split()[0] in RAY else c for c in bench_commands()],
)
def test_benchmark_runs_at_its_smoke_size(command, tmp_path):
    script, *args = command.split()
    # their temporary folders land in the test's; Ray's (socket paths of at most 107 bytes) stays where it was
    env = {**os.environ, "TMPDIR": str(tmp_path), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", tempfile.gettempdir())}
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # it reported figures, not only a header: a table row with a number, or a figure with its unit
    row = re.search(r"^\| [^-|][^|\n]*\|.*\d", proc.stdout, re.M)
    assert row or re.search(r"\d ?(x|×|s|steps/s|rows/s)(?!\w)", proc.stdout), proc.stdout[-2000:]
