"""The device side of sliding-window inference: windows in, one blended block out.

For one block the host sends the padded input *hull* (every voxel the block's windows read,
``[Az, Ay, Ax, cin]`` float32, zero beyond the hull) once. On the device, each call of
:meth:`WindowEngine.step` cuts a batch of windows out of the hull, runs the network (through every
test-time view, ensembled), multiplies by the blending weights and adds the result into a fixed
``[Az, Ay, Ax, C]`` accumulator (with the weights into ``[Az, Ay, Ax]``). :meth:`finalize` divides,
applies the activation if it comes after blending, casts, and cuts the ``[C, bz, by, bx]`` block.

Nothing per window crosses the host-device link: only the hull goes in and the block comes out.
The accumulator shape is the same for every block of a volume, so the step compiles once.

Many devices: the window batch is split over a 1-D ``('data',)`` mesh of local devices, each
device running ``batch_size`` windows per call, and the outputs are gathered so that every
device adds all windows into its copy of the accumulator in the same global window order. Each
window sees the same per-device program and every voxel the same sequence of additions, so the
output is bit-for-bit the one a single device writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.inference import tta as tta_lib
from jaxseg.inference.geometry import BlockPlan, blend_weights
from jaxseg.inference.settings import InferenceSettings
from jaxseg.training import sharding as sharding_lib

# PyTC divides by max(sum(w), 1e-6): voxels no window reaches (none, with every profile > 0)
# must not become NaN.
_MIN_WEIGHT = 1e-6

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def activation_fn(name: str, temperature: float = 1.0) -> Callable[[jax.Array], jax.Array]:
  """``sigmoid``, ``scale_sigmoid`` (``sigmoid(x / temperature)``) or ``none`` (identity)."""
  if name == "sigmoid":
    return jax.nn.sigmoid
  if name == "scale_sigmoid":
    scale = 1.0 / float(temperature)
    return lambda x: jax.nn.sigmoid(x * scale)
  if name == "none":
    return lambda x: x
  raise ValueError(f"unknown activation {name!r}; expected sigmoid, scale_sigmoid or none")


def model_apply(model) -> tuple[ApplyFn, Any]:
  """Splits an NNX model into a pure ``apply(variables, x) -> float32 logits`` and its variables."""
  from flax import nnx

  graphdef, variables = nnx.split(model)

  def apply(variables, x):
    return nnx.merge(graphdef, variables)(x).astype(jnp.float32)

  return apply, variables


class WindowEngine:
  """Predicts blocks of windows with one compiled step per volume geometry.

  Args:
    apply: ``apply(variables, x[b, z, y, x, cin]) -> logits[b, z, y, x, C]`` (pure, jittable).
    variables: the model's variables (any pytree; replicated on every device).
    settings: the resolved ``config.infer``.
    views: the test-time views (``tta.tta_views``); ``(tta.IDENTITY,)`` for none.
    sharding: the process-local ``('data',)`` mesh and its shardings
      (``sharding.create_sharding(n, local=True)``; default: every local device).
  """

  def __init__(
    self,
    apply: ApplyFn,
    variables: Any,
    settings: InferenceSettings,
    views: tuple = (tta_lib.IDENTITY,),
    sharding: sharding_lib.Sharding | None = None,
  ):
    self.settings = settings
    self.views = tuple(views)
    if sharding is None:
      sharding = sharding_lib.create_sharding(local=True)
    self.replicated = sharding.replicated
    self.batched = sharding.batch
    self.num_devices = sharding.num_devices
    self.batch_size = settings.batch_size * self.num_devices  # windows per call, all devices
    self.variables = jax.device_put(variables, self.replicated)
    self._apply = apply
    self._weights = jax.device_put(
      jnp.asarray(blend_weights(settings.window, settings.blending)), self.replicated
    )
    self._activation = activation_fn(settings.activation, settings.temperature)
    self._channels = np.asarray(settings.output_channels, np.int32)
    self._steps: dict[tuple, Callable] = {}
    self._finals: dict[tuple, Callable] = {}

  @property
  def num_channels(self) -> int:
    return len(self.settings.output_channels)

  # -- the two compiled functions ------------------------------------------------------------------

  def _predict_windows(self, variables, windows: jax.Array) -> jax.Array:
    """``[b, z, y, x, cin]`` -> ``[b, z, y, x, C_out]`` float32, views ensembled."""
    s = self.settings
    activation = self._activation if s.activation_before_blend else None
    n_aff = len(s.offsets)

    def affinity_logits(x):
      # A model with local shape descriptors has them after the affinities: never written.
      y = self._apply(variables, x)
      return y[..., :n_aff] if y.shape[-1] > n_aff else y

    out = tta_lib.predict_with_tta(
      affinity_logits,
      windows,
      self.views,
      s.offsets,
      s.convention,
      s.tta["ensemble"],
      activation,
    )
    return out[..., self._channels]

  def _step_fn(self, acc_shape: tuple[int, int, int], cin: int) -> Callable:
    key = (acc_shape, cin)
    if key in self._steps:
      return self._steps[key]
    window = self.settings.window
    replicated = self.replicated

    def step(variables, blend, acc, wsum, hull, starts, active):
      def cut(start):
        return jax.lax.dynamic_slice(hull, (start[0], start[1], start[2], 0), (*window, cin))

      windows = jax.vmap(cut)(starts)
      out = self._predict_windows(variables, windows)
      weights = jnp.where(active[:, None, None, None], blend[None], 0.0)
      out = jnp.where(active[:, None, None, None, None], out * weights[..., None], 0.0)
      # Every device adds every window, in batch order: the sums do not depend on the mesh.
      out = jax.lax.with_sharding_constraint(out, replicated)
      weights = jax.lax.with_sharding_constraint(weights, replicated)

      def add(i, carry):
        acc, wsum = carry
        z, y, x = starts[i, 0], starts[i, 1], starts[i, 2]
        region = jax.lax.dynamic_slice(acc, (z, y, x, 0), out.shape[1:])
        acc = jax.lax.dynamic_update_slice(acc, region + out[i], (z, y, x, 0))
        wregion = jax.lax.dynamic_slice(wsum, (z, y, x), window)
        wsum = jax.lax.dynamic_update_slice(wsum, wregion + weights[i], (z, y, x))
        return acc, wsum

      return jax.lax.fori_loop(0, starts.shape[0], add, (acc, wsum))

    fn = jax.jit(
      step,
      in_shardings=(
        replicated,
        replicated,
        replicated,
        replicated,
        replicated,
        self.batched,
        self.batched,
      ),
      out_shardings=(replicated, replicated),
      donate_argnums=(2, 3),
    )
    self._steps[key] = fn
    return fn

  def _finalize_fn(self, acc_shape: tuple[int, int, int], block_shape: tuple[int, int, int]):
    key = (acc_shape, block_shape)
    if key in self._finals:
      return self._finals[key]
    s = self.settings
    after = None if s.activation_before_blend else self._activation
    dtype = jnp.dtype(s.output_dtype)
    channels = self.num_channels

    def finalize(acc, wsum, crop_start):
      z, y, x = crop_start[0], crop_start[1], crop_start[2]
      values = jax.lax.dynamic_slice(acc, (z, y, x, 0), (*block_shape, channels))
      weight = jax.lax.dynamic_slice(wsum, (z, y, x), block_shape)
      blended = values / jnp.maximum(weight, _MIN_WEIGHT)[..., None]
      if after is not None:
        blended = after(blended)
      return jnp.moveaxis(blended, -1, 0).astype(dtype)

    fn = jax.jit(finalize, out_shardings=self.replicated)
    self._finals[key] = fn
    return fn

  # -- per block -------------------------------------------------------------------------------

  def put_hull(self, hull: np.ndarray) -> jax.Array:
    """Places a host hull ``[Az, Ay, Ax, cin]`` float32 on every device (asynchronously)."""
    return jax.device_put(hull, self.replicated)

  def predict_block(
    self, hull: jax.Array, block: BlockPlan, block_shape: tuple[int, int, int]
  ) -> jax.Array:
    """Runs every window of ``block`` and returns the blended ``[C, bz, by, bx]`` block.

    Dispatch is asynchronous: the call returns as soon as the work is queued, so the host can
    read the next hull and write the previous block meanwhile. ``block_shape`` is the geometry's
    (full) block shape; blocks at the volume's far faces are cut to size by the caller.
    """
    acc_shape = tuple(int(n) for n in hull.shape[:3])
    cin = int(hull.shape[3])
    step = self._step_fn(acc_shape, cin)
    # Made on every device at once, not on the first device and then copied to the others.
    acc = jnp.zeros((*acc_shape, self.num_channels), jnp.float32, device=self.replicated)
    wsum = jnp.zeros(acc_shape, jnp.float32, device=self.replicated)
    windows = np.asarray(block.windows, np.int32).reshape(-1, 3)
    b = self.batch_size
    for first in range(0, len(windows), b):
      starts = np.zeros((b, 3), np.int32)
      active = np.zeros((b,), bool)
      chunk = windows[first : first + b]
      starts[: len(chunk)] = chunk
      active[: len(chunk)] = True
      acc, wsum = step(self.variables, self._weights, acc, wsum, hull, starts, active)
    final = self._finalize_fn(acc_shape, tuple(int(n) for n in block_shape))
    return final(acc, wsum, np.asarray(block.crop_start, np.int32))
