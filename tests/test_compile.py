"""trainer.compile=true: the compiled network trains to the eager run's numbers (per-task gradients through the
compiled graph, and a population's compiled vectorised call), and what cannot be compiled is refused. Compiling
costs tens of seconds on a CPU, so the models are the smallest that run."""

import pytest
import torch

from experiments.run import run
from mtl_lightning.errors import MTLError

TINY = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "data.batch_size=32", "trainer.max_epochs=1"]
TINY += ["test=false", "model.depth=1", "model.width=32"]


def params(m):
    ckpt = torch.load(f"{m['run_dir']}/checkpoints/last.ckpt", weights_only=False)
    return ckpt["state_dict"]


@pytest.mark.parametrize("extra", [["weighting=pcgrad"], ["population.weights=[[0.5,0.5],[0.2,0.8]]"]])
def test_compiled_training_matches_eager(extra, make_cfg, tmp_path):
    eager = run(make_cfg("digits_mtl", *TINY, *extra, out_dir=tmp_path / "a"))
    compiled = run(make_cfg("digits_mtl", *TINY, *extra, "trainer.compile=true", out_dir=tmp_path / "b"))
    a, b = params(eager), params(compiled)
    assert a.keys() == b.keys()  # compiled in place: the checkpoint's parameter names are the eager ones
    for k in a:  # float reassociation in the compiled kernels, which Adam's normalisation magnifies in small gradients
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3), (k, (a[k].float() - b[k].float()).abs().max())
    loss = next(k for k in eager if k.startswith("val/loss/"))
    assert compiled[loss] == pytest.approx(eager[loss], abs=1e-3)


def test_compiling_a_graph_network_is_refused(make_cfg):
    pytest.importorskip("torch_geometric")
    with pytest.raises(MTLError, match="trainer.compile=true with model.backbone=mpnn"):
        run(make_cfg("synthetic_graphs", "trainer.compile=true"))
