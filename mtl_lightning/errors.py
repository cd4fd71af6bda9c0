"""User-facing errors: one clear paragraph, printed without a traceback by `experiments.run`."""


class MTLError(Exception):
    """Bad input from the user (config, data, weights) or a run that cannot go on (NaN loss)."""


class NonFiniteLossError(MTLError):
    """A task loss became NaN or infinite during training."""
