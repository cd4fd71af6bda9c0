"""Pluggable loss weightings, selected by name: `weighting=NAME` on the command line."""

from __future__ import annotations

from collections.abc import Sequence

from . import (  # noqa: F401  (registers the methods)
    aligned_mtl,
    arml,
    auto_lambda,
    bayesagg_mtl,
    cagrad,
    config_agg,
    cosmos,
    cr_mogm,
    db_mtl,
    dualproj,
    dwa,
    excess_mtl,
    fairgrad,
    famo,
    fixed,
    forkmerge,
    forum,
    gcs,
    gls,
    go4align,
    graddrop,
    gradnorm,
    gradvac,
    imtl_g,
    imtl_l,
    ldc_mtl,
    mgda,
    moco,
    modo,
    nash_mtl,
    ol_aux,
    pbi,
    pcgrad,
    post_train,
    rlw,
    sdmgrad,
    stch,
    uncertainty,
    uniform,
    upgrad,
)
from .base import Weighting, check_weights
from .registry import WEIGHTINGS


def create_weighting(tasks: Sequence[str], cfg) -> Weighting:
    """Build the weighting named `cfg.name` for `tasks`; unknown names raise with the valid choices."""
    return WEIGHTINGS.get(cfg.name)(tasks, cfg)


__all__ = ["WEIGHTINGS", "Weighting", "check_weights", "create_weighting"]
