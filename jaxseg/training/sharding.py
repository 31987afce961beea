"""Data-parallel sharding: a 1-D ``('data',)`` mesh, replicated state, batch split on axis 0.

Owns the mesh (``train.mesh_devices`` devices, 0 = all, across every host), the two shardings the
training step uses (``replicated`` for parameters / optimizer / EMA, ``batch`` for arrays whose
leading axis is the global batch ``[B, ...]``) and the assembly of global batches from per-host
numpy batches with ``jax.make_array_from_process_local_data`` (multi-host safe: each process
passes only its own rows).

UNets for 3-D EM are small next to their activations, so plain data parallelism with replicated
parameters is the right split; the loss reduces over the global batch inside ``jax.jit``, which
inserts the cross-device sums itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxseg.common.errors import ConfigError

DATA_AXIS = "data"


class Sharding(NamedTuple):
  """The mesh and its two shardings."""

  mesh: jax.sharding.Mesh
  replicated: jax.NamedSharding
  batch: jax.NamedSharding

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def num_local_devices(self) -> int:
    """Devices of the mesh attached to this process (its share of the global batch)."""
    return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)


def make_mesh(num_devices: int = 0, *, local: bool = False) -> jax.sharding.Mesh:
  """A ``('data',)`` mesh over the first ``num_devices`` devices (0 = all devices).

  Multi-host runs must use every device (a mesh that skips some host's devices would leave that
  host without data); a subset is for single-host experiments and tests. ``local=True`` builds
  the mesh over this process's devices only (prediction: each process works on its own blocks,
  so no collective crosses the network).
  """
  devices = jax.local_devices() if local else jax.devices()
  n = len(devices) if not num_devices else int(num_devices)
  if n < 1 or n > len(devices):
    if local:
      raise ConfigError(f"num_devices={num_devices}: this process has {len(devices)} device(s)")
    raise ConfigError(f"train.mesh_devices={num_devices}: this run has {len(devices)} device(s)")
  if not local and jax.process_count() > 1 and n != len(devices):
    raise ConfigError(
      f"train.mesh_devices={num_devices} with {jax.process_count()} processes: a multi-host run "
      f"must use all {len(devices)} devices (set train.mesh_devices=0)"
    )
  # Auto axes: jax >= 0.10 defaults make_mesh to Explicit; the step relies on jit's propagation.
  return jax.make_mesh(
    (n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n]
  )


def create_sharding(num_devices: int = 0, *, local: bool = False) -> Sharding:
  """The mesh of :func:`make_mesh` with its replicated and batch shardings."""
  mesh = make_mesh(num_devices, local=local)
  return Sharding(
    mesh=mesh,
    replicated=jax.NamedSharding(mesh, jax.P()),
    batch=jax.NamedSharding(mesh, jax.P(DATA_AXIS)),
  )


def global_batch_size(per_device_batch: int, sharding: Sharding) -> int:
  """Global batch = per-device batch x devices in the mesh."""
  return int(per_device_batch) * sharding.num_devices


def local_batch_size(per_device_batch: int, sharding: Sharding) -> int:
  """Rows of the global batch this process reads (per-device batch x its devices)."""
  return int(per_device_batch) * sharding.num_local_devices


def to_global(host_batch: Any, sharding: Sharding) -> Any:
  """Turns this process's numpy batch (a pytree of ``[b_local, ...]``) into global jax arrays.

  Each leaf becomes a ``[b_local * processes, ...]`` array sharded on axis 0 over the mesh.
  """

  def one(x):
    return jax.make_array_from_process_local_data(sharding.batch, np.asarray(x))

  return jax.tree.map(one, host_batch)


def replicate(tree: Any, sharding: Sharding) -> Any:
  """Places a pytree of arrays replicated on every device of the mesh."""
  return jax.device_put(tree, sharding.replicated)
