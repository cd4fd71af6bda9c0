"""The search against a Ray cluster started here (a head and one worker node on 127.0.0.1), via RAY_ADDRESS.

Its own module: `ray stop` ends every Ray process on the machine, so it must not share one with other tests.
"""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # every Ray test on one xdist worker, in turn (conftest.py says why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_runs_on_a_ray_cluster(tmp_path):
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # a throwaway local cluster: no token to distribute
    node = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *node], env=env, check=True
        )
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", *node], env=env, check=True)
        cmd = [sys.executable, "-m", "experiments.search", "exp=synthetic_mtl", "search=grid", "search.grid=[0.0,1.0]"]
        cmd += ["search.baselines=false", "data.num_tasks=2", "data.train_size=300", "trainer.max_epochs=1"]
        cmd += [f"search.storage_path={tmp_path / 'shared'}", "logger=csv", f"out_dir={tmp_path}"]
        probe = "import ray; ray.init(); print(len(ray.nodes()), int(ray.cluster_resources()['CPU']))"
        nodes = subprocess.run(
            [sys.executable, "-c", probe],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        assert nodes == ["2", "2"]  # the worker joined: two nodes, one CPU each
        r = subprocess.run(cmd, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = list(csv.DictReader(open(tmp_path / "shared" / "synthetic_mtl-grid" / "grid.csv")))
        assert sorted(r["p"] for r in rows) == ["0.0", "1.0"]
        # each trial's run directory is in the shared storage, whichever node trained it
        assert (
            len(list((tmp_path / "shared" / "synthetic_mtl-grid" / "runs" / "synthetic_mtl").glob("*/config.yaml")))
            == 2
        )
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)
