from __future__ import annotations

from ..registry import Registry

WEIGHTINGS: Registry = Registry("weighting", "weighting")
