"""Every benchmark runs: each command of `make bench`, at its tiny `--smoke` size, so an API change that breaks a
benchmark breaks a test (BENCHMARKS.md's figures must stay reproducible with the commands it prints)."""

import os
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

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
def test_benchmark_runs_at_its_smoke_size(command, tmp_path, monkeypatch, capsys, request):
    """The script as `python benchmarks/<script> <args> --smoke` runs it, in this process: a new interpreter per
    script cost ~5 s of imports each (and ~10 s for those that re-execute themselves for their allocator)."""
    script, *args = command.split()
    if script in RAY:
        request.getfixturevalue("shared_ray")  # the group's Ray: a benchmark uses a Ray that is up, and leaves it
    # their temporary folders land in the test's; the glibc settings the memory benchmarks re-execute themselves
    # for are only read at start-up, so they would change nothing here: said as set, the scripts run on
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / script), *args, "--smoke"])
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])
    monkeypatch.chdir(ROOT)
    own = set(sys.modules)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (None, 0), capsys.readouterr().err[-3000:]
    finally:
        torch.set_num_threads(threads)  # some compare thread counts
        for name in set(sys.modules) - own:  # benchmarks import each other by file name (`from methods import`)
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(ROOT / "benchmarks")):
                del sys.modules[name]
    out = capsys.readouterr().out
    # it reported figures, not only a header: a table row with a number, or a figure with its unit
    row = re.search(r"^\| [^-|][^|\n]*\|.*\d", out, re.M)
    assert row or re.search(r"\d ?(x|×|s|steps/s|rows/s)(?!\w)", out), out[-2000:]
