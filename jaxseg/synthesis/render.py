"""EM-like image rendering from a label cube: dark membranes, textured cytoplasm, blur, noise, defects.

Owns :func:`render_image` and :func:`membrane_mask`. Arrays are canonical ``[z, y, x]``: ``seg``
integer ids (0 = extracellular space), the image uint8 in 0..255.

Image model (intensities in [0, 1] before quantisation):

- Intracellular voxels: ``cytoplasm_intensity`` plus a per-neuron offset (``cell_intensity_std``;
  real processes differ in electron density), smooth low-frequency texture (``texture_std``) and
  sparse dark vesicle-like dots whose density varies per neuron (``vesicle_density`` at most), and
  in half of the neurons mitochondria-like dark blobs (~100 nm, ``organelle_fraction`` of the
  interior) kept two voxels away from the membrane, so that not every dark structure is a
  boundary.
- Membranes: every labelled voxel that is 6-adjacent in-plane to a different value (another id or
  extracellular space) is set to ``membrane_intensity``; one adjacent only along z (a membrane
  lying nearly in the section plane) gets half that darkening. At a contact between two touching
  neurites both sides are membrane, so the dark line is two voxels wide, as two apposed membranes
  are.
- Extracellular space: ``extracellular_intensity`` (mid grey, lighter than membranes).
- Anisotropic Gaussian point-spread (``blur_sigma_nm`` converted to voxels per axis), additive
  Gaussian noise (``noise_std``), then optional slice defects that corrupt the image only: missing
  slices (black) and in-plane shifted slices.
"""

from __future__ import annotations

import statistics

import numba
import numpy as np
import scipy.ndimage


@numba.njit(cache=True)
def _membrane(seg, out):
  nz, ny, nx_ = seg.shape
  for z in range(nz):
    for y in range(ny):
      for x in range(nx_):
        v = seg[z, y, x]
        if v == 0:
          continue
        if (
          (x > 0 and seg[z, y, x - 1] != v)
          or (x + 1 < nx_ and seg[z, y, x + 1] != v)
          or (y > 0 and seg[z, y - 1, x] != v)
          or (y + 1 < ny and seg[z, y + 1, x] != v)
        ):
          out[z, y, x] = 2
        elif (z > 0 and seg[z - 1, y, x] != v) or (z + 1 < nz and seg[z + 1, y, x] != v):
          out[z, y, x] = 1


def membrane_mask(seg: np.ndarray) -> np.ndarray:
  """Membrane voxels of ``seg``, uint8 [z, y, x].

  A labelled voxel is membrane when it is 6-adjacent to a different value (another id or 0):
  ``2`` if the contact is in-plane (the membrane crosses the section: a sharp dark line), ``1`` if
  it is only along z (the membrane lies almost in the section plane: a faint smear in EM), ``0``
  otherwise. Voxels at the cube faces are not membrane just for being at the face.
  """
  out = np.zeros(seg.shape, np.uint8)
  _membrane(np.ascontiguousarray(seg), out)
  return out


def _smooth_noise(rng: np.random.Generator, shape, factor) -> np.ndarray:
  """Unit-std low-frequency noise: coarse white noise upsampled (cheap on 2 cores)."""
  coarse_shape = tuple(max(2, -(-s // f)) for s, f in zip(shape, factor, strict=True))
  coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
  zoom = [s / c for s, c in zip(shape, coarse_shape, strict=True)]
  fine = scipy.ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
  fine = fine[: shape[0], : shape[1], : shape[2]]
  # Linear interpolation lowers the variance; restore unit std.
  return fine / max(float(fine.std()), 1e-6)


def render_image(seg: np.ndarray, params, rng: np.random.Generator) -> np.ndarray:
  """Renders an EM-like image of ``seg``.

  Args:
    seg: [z, y, x] integer labels, 0 = extracellular space.
    params: resolved :class:`jaxseg.synthesis.config.SynthParams`.
    rng: generator (consumed deterministically).

  Returns:
    uint8 [z, y, x] image.
  """
  shape = seg.shape
  resolution = np.asarray(params.resolution, np.float64)
  n_ids = int(seg.max()) + 1
  cell_offset = rng.normal(0.0, params.cell_intensity_std, n_ids).astype(np.float32)
  # Vesicle-rich processes (boutons) are a minority: density ~ U(0,1)^3 * max.
  vesicles = (rng.random(n_ids) ** 3 * params.vesicle_density).astype(np.float32)
  cell_offset[0] = 0.0
  vesicles[0] = 0.0

  inside = seg > 0
  img = np.full(shape, params.extracellular_intensity, np.float32)
  cyto = params.cytoplasm_intensity + cell_offset[seg]
  # Texture with ~50 nm and ~150 nm correlation lengths (organelles, cytoskeleton).
  fine_factor = np.maximum(1, np.round(50.0 / resolution)).astype(int)
  coarse_factor = np.maximum(1, np.round(150.0 / resolution)).astype(int)
  texture = 0.6 * _smooth_noise(rng, shape, fine_factor)
  texture += 0.8 * _smooth_noise(rng, shape, coarse_factor)
  cyto += params.texture_std * texture
  dots = rng.random(shape, dtype=np.float32) < vesicles[seg]
  cyto[dots] -= 0.45
  membrane = membrane_mask(seg)
  if params.organelle_fraction > 0:
    blob_factor = np.maximum(1, np.round(100.0 / resolution)).astype(int)
    blobs = _smooth_noise(rng, shape, blob_factor)
    threshold = statistics.NormalDist().inv_cdf(1.0 - params.organelle_fraction)
    bearing = rng.random(n_ids) < 0.5
    bearing[0] = False
    in_plane_cross = np.zeros((1, 3, 3), bool)
    in_plane_cross[0, 1, :] = in_plane_cross[0, :, 1] = True
    near_membrane = scipy.ndimage.binary_dilation(membrane > 0, in_plane_cross, iterations=2)
    organelle = (blobs > threshold) & bearing[seg] & ~near_membrane
    cyto[organelle] = params.membrane_intensity + 0.25 * (
      params.cytoplasm_intensity - params.membrane_intensity
    )
  np.copyto(img, cyto, where=inside)
  img[membrane == 2] = params.membrane_intensity
  flat = membrane == 1
  img[flat] = 0.5 * (img[flat] + params.membrane_intensity)

  sigma = np.asarray(params.blur_sigma_nm, np.float64) / resolution
  if np.any(sigma > 0):
    img = scipy.ndimage.gaussian_filter(img, sigma=sigma, mode="nearest", truncate=3.0)
  if params.noise_std > 0:
    img += rng.normal(0.0, params.noise_std, shape).astype(np.float32)
  _slice_defects(img, params, rng)
  return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _slice_defects(img: np.ndarray, params, rng: np.random.Generator) -> None:
  """Missing (black) and in-plane shifted z slices, in place; seg is unaffected."""
  nz = img.shape[0]
  missing = rng.random(nz) < params.missing_slice_prob
  shifted = rng.random(nz) < params.shifted_slice_prob
  max_shift = int(params.shifted_slice_max_voxels)
  shifts = rng.integers(-max_shift, max_shift + 1, size=(nz, 2))
  for z in np.nonzero(shifted & ~missing)[0]:
    img[z] = scipy.ndimage.shift(img[z], shifts[z], order=0, mode="nearest")
  img[missing] = 0.0
