"""The learning curve's points as the DVC plot file, the chart and the report read them: per k, the mean test
accuracy over the seeds' runs (pipeline.heads.curves) with its 95% t-interval."""

from __future__ import annotations

import numpy as np

from pipeline.results.stats import t_interval


def summarised(points: list[dict], confidence: float = 0.95) -> list[dict]:
    """Each point with `accuracy` (the mean over its runs: the plot's y), `low` and `high` (Student's t interval over
    seeds, n - 1 degrees of freedom, clipped to [0, 1]; null for a single run) and `seeds` (runs), before its runs."""
    out = []
    for point in points:
        scores = [run["accuracy"] for run in point["runs"]]
        interval = t_interval(scores, confidence)
        low, high = (None, None) if interval is None else (max(0.0, interval[0]), min(1.0, interval[1]))
        head = {key: point[key] for key in ("model", "label", "per_class", "val_per_class")}
        rest = {key: value for key, value in point.items() if key not in head}
        out.append({**head, "accuracy": float(np.mean(scores)), "low": low, "high": high, "seeds": len(scores), **rest})
    return out
