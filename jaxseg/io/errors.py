"""The one exception type for bad volumes: it always names the file and what was expected."""

from jaxseg.common.errors import InputError


class VolumeError(InputError):
  """A volume is missing, malformed, or not what the caller expected.

  The message names the file (and dataset / array), what was found and what was expected, e.g.
  ``data.zarr/seg: expected 3 axes (x, y, z), found shape (10, 20, 30, 1)``.
  """
