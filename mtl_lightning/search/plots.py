"""matplotlib for the search's and the studies' figures."""

from __future__ import annotations


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (trials and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
