"""Heatmaps as 8-bit grayscale PNGs: value = min + (max − min) · pixel / 255."""

import base64
import io
from typing import Any

import numpy as np
from PIL import Image


def encode(m: np.ndarray) -> dict[str, Any]:
    """(H, W) float -> {"png_base64", "shape", "min", "max"}."""
    lo, hi = float(m.min()), float(m.max())
    span = hi - lo if hi > lo else 1.0
    pixels = np.round((m - lo) / span * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "PNG")
    return {"png_base64": base64.b64encode(buf.getvalue()).decode(), "shape": list(m.shape), "min": lo, "max": hi}
