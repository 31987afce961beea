"""PNG previews of a volume and its labels: xy slices of the image and of the image with a label
overlay, for every stage that writes one (a generated cube's ``preview.png``, a decode's).

Owns :func:`preview_image` and :func:`save_preview`. Inputs are canonical ``[z, y, x]``: ``img``
uint8, ``seg`` integer ids (0 = extracellular space / background). Output: an RGB uint8
[H, W, 3] mosaic with three xy slices (at 1/4, 1/2, 3/4 of z) in columns; top row the image,
bottom row the image with each label tinted in a stable colour (0 untinted). Needs only numpy and
PIL, so any layer may use it; never imports JAX.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from jaxseg.common.files import atomic_output

_MIN_PANEL = 256  # small cubes are upscaled (nearest) so the preview stays readable


def _colours(n: int) -> np.ndarray:
  """Stable, well spread RGB colours for ids 0..n-1 (golden-ratio hues)."""
  ids = np.arange(n, dtype=np.float64)
  hue = (ids * 0.618033988749895) % 1.0
  sat = 0.65 + 0.35 * ((ids * 0.7548776662466927) % 1.0)
  h6 = hue * 6.0
  x = 1.0 - np.abs(h6 % 2.0 - 1.0)
  sector = h6.astype(int) % 6
  rgb = np.zeros((n, 3))
  table = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)]
  for s, (r, g, b) in enumerate(table):
    sel = sector == s
    for c, v in enumerate((r, g, b)):
      rgb[sel, c] = v[sel] if isinstance(v, np.ndarray) else v
  rgb = 1.0 - sat[:, None] * (1.0 - rgb)
  return (rgb * 255).astype(np.uint8)


def preview_image(img: np.ndarray, seg: np.ndarray, alpha: float = 0.35) -> np.ndarray:
  """Builds the preview mosaic (see the module docstring) as RGB uint8 [H, W, 3]."""
  nz = img.shape[0]
  zs = sorted({min(nz - 1, max(0, int(nz * f))) for f in (0.25, 0.5, 0.75)})
  colours = _colours(int(seg.max()) + 1)
  scale = max(1, int(np.ceil(_MIN_PANEL / max(1, min(img.shape[1:])))))
  top, bottom = [], []
  for z in zs:
    grey = np.repeat(img[z][..., None].astype(np.float32), 3, axis=-1)
    tint = colours[seg[z]].astype(np.float32)
    mixed = np.where((seg[z] > 0)[..., None], (1 - alpha) * grey + alpha * tint, grey)
    for row, panel in ((top, grey), (bottom, mixed)):
      panel = np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1)
      row.append(np.pad(panel, ((2, 2), (2, 2), (0, 0)), constant_values=255))
  return np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0).astype(np.uint8)


def save_preview(path: str, img: np.ndarray, seg: np.ndarray) -> str:
  """Writes :func:`preview_image` as a PNG (atomically) and returns the path."""
  with atomic_output(path) as tmp:
    Image.fromarray(preview_image(img, seg)).save(tmp)
  return path
