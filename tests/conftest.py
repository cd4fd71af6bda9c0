import os
import sys

import pytest

from mtl_lightning.config import compose

os.environ.setdefault("WANDB_MODE", "offline")  # tests never reach the network
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers on two cores, one thread each (and subprocesses)
    # a tiny model gains nothing from a second thread (a method-learning test: 33.2 s on 1 thread, 34.5 s on 2)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    # The Ray tests' modules carry xdist_group("ray"), so --dist loadgroup runs them in turn on one worker: two local
    # Ray clusters at once would share the two cores three ways, and the cluster test's `ray stop` ends every one.
    # Ray starts its workers at niceness 15, for a machine doing other work; here the other xdist worker's tests are
    # that work, so a trial got almost no CPU beside them (the semi-supervised study test: 10 s alone, 75-133 s in
    # the suite) and the Ray group, one chain on one worker, could end long after the other. Same priority for both.
    os.environ.setdefault("RAY_worker_niceness", "0")

QUIET = ["trainer.enable_progress_bar=false", "logger=csv"]


@pytest.fixture
def make_cfg(tmp_path):
    """compose(exp, overrides) writing into this test's tmp dir, quietly."""

    def make(exp: str, *overrides: str, out_dir=None):
        return compose(exp, [f"out_dir={out_dir or tmp_path / 'runs'}", *QUIET, *overrides])

    return make


def _ray_up() -> bool:
    ray = sys.modules.get("ray")  # not imported: certainly not up (and no import of Ray for every test)
    return ray is not None and ray.is_initialized()


@pytest.fixture(scope="session")
def _ray_until_the_end():
    yield
    if _ray_up():
        sys.modules["ray"].shutdown()


@pytest.fixture
def shared_ray(_ray_until_the_end):
    """One local Ray (2 CPUs, as a search starts it) for the "ray" group's in-process searches and studies: a start
    and shutdown cost ~5 s. The first test that asks starts it; it stays up for the next ones (a search uses a Ray
    that is up, and leaves it) and goes when the worker's session ends. A test that needs none up takes `no_ray`."""
    from mtl_lightning.search.ray_session import init_ray

    init_ray(2)  # nothing if it is up


@pytest.fixture
def no_ray():
    """No Ray up when the test starts (it checks what a search starts and stops, or a Ray of its own making)."""
    if _ray_up():
        sys.modules["ray"].shutdown()


@pytest.fixture(autouse=True)
def no_ray_left_behind(request):
    """Fail the test that leaves a Ray session behind, where it happens: a leaked local cluster would make a later
    test's ray.init fail, or share the cores with the "ray" group, depending on which worker runs what. The shared
    one (`shared_ray`) is meant to stay."""
    before = _ray_up()
    yield
    if not before and _ray_up() and "shared_ray" not in request.fixturenames:
        import ray

        ray.shutdown()  # so the next test starts clean
        pytest.fail(
            f"{request.node.nodeid} left Ray initialised: shut down what a test starts (a fixture), and put every test "
            'that starts Ray in xdist_group("ray").',
            pytrace=False,
        )
