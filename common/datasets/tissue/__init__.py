"""Synthetic H&E tissue renderer (numpy/scipy only): architecture, cells and nuclei, stain optics and scanners.

SYNTHETIC data. `render_patch` draws one patch of one of the 8 BreakHis subtypes for a patient's
biology (`sample_biology`) seen through a lab's stain (`optics.Stain`) and scanner (`optics.Scanner`).
A patch spans FIELD_UM micrometres: UM_PER_PX at the 64 px reference size.
"""

from __future__ import annotations

from pathlib import Path

from common.datasets.tissue.nuclei import MORPHOMETRY
from common.datasets.tissue.optics import E_OD, H_OD, Scanner, Stain, lab_vectors, unit
from common.datasets.tissue.patch import (
    FIELD_UM, REFERENCE_SIZE, UM_PER_PX, canvas_size, draw_patch, render_patch, sample_biology,
)
from common.datasets.tissue.subtypes import SUBTYPES, Biology, Subtype

__all__ = [
    "E_OD", "FIELD_UM", "H_OD", "MORPHOMETRY", "REFERENCE_SIZE", "SUBTYPES", "UM_PER_PX", "Biology", "Scanner", "Stain", "Subtype",
    "canvas_size", "draw_patch", "lab_vectors", "render_patch", "sample_biology", "source_files", "unit",
]


def source_files() -> list[Path]:
    """Every source file of the renderer (a cache keyed on them invalidates when the generator changes)."""
    return sorted(Path(__file__).parent.glob("*.py"))
