"""Moved: ReFT positions live with ReFT, in `alignkit.interventions.positions` (re-exported here)."""

from alignkit.interventions.positions import (  # noqa: F401
    Positions, locations_from_mask, locations_from_spans, prompt_spans, prompt_spans_from_mask,
)

__all__ = ["Positions", "locations_from_mask", "locations_from_spans", "prompt_spans", "prompt_spans_from_mask"]
