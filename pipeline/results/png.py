"""Figures as PNG files: one backend (Agg: files only, no display), one resolution, written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before any figure exists: the modules that draw import this one

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.core.io import atomic_path  # noqa: E402

DPI = 110


def save_png(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG at DPI (atomically, creating the folder), and close it."""
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)
