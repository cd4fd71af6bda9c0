"""The search against a Ray cluster started here (a head and one worker node on 127.0.0.1), via RAY_ADDRESS.

Its own module. At the end only this cluster's processes are stopped (they name its port): `ray stop` would end
every Ray process on the machine, a developer's running study included.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # every Ray test on one xdist worker, in turn (conftest.py says why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(port: int) -> list[int]:
    """The Ray processes of the cluster at `port` (its GCS, raylets, workers and agents name the port), no other."""
    marks, pids = (f"127.0.0.1:{port}", f"--gcs_server_port={port}", f"--port={port}"), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if int(proc.name) != os.getpid() and "ray" in cmd and any(m in cmd for m in marks):
            pids.append(int(proc.name))
    return pids


def _stop_cluster(port: int) -> None:
    for pid in _cluster_pids(port):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    # `ray start` names its cluster in <temp>/ray/ray_current_cluster for a plain ray.init() to join; not any more
    for path in Path(tempfile.gettempdir(), "ray").glob("ray_current_cluster"):
        if path.read_text().strip().endswith(f":{port}"):
            path.unlink(missing_ok=True)


def test_search_runs_on_a_ray_cluster(no_ray, tmp_path):
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
        _stop_cluster(port)
    time.sleep(1)
    assert not _cluster_pids(port)  # nothing of it left, and no other Ray on the machine touched
