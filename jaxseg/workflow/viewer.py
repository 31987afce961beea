"""Neuroglancer layout of a run's volumes, and ``--view``: serving them to a local viewer.

Owns:
  * :func:`affinity_display`: a uint8 copy (0..255) of an affinity volume's three decoded edges
    ``[3, z, y, x]`` (z, y, x edges), written in z slabs: Neuroglancer reads no float16, which is
    what ``jaxseg.predict`` stores.
  * :func:`neuroglancer_state`: a Neuroglancer viewer state (a JSON-ready dict) with image,
    affinity, segmentation and ground-truth layers. Every source is a ``zarr://`` / ``n5://`` /
    ``precomputed://`` URL under one local HTTP server whose folders are named roots (``workdir``
    = the run folder, ``data`` = ``config.data.root``): ``http://127.0.0.1:8000/workdir/...``.
    Each source's transform names its on-disk axes (NISB images are x, y, z, c on disk) with the
    resolution in metres, so every layer lines up in one x / y / z space.
  * :func:`write_layout`: ``results/neuroglancer.json``.
  * :func:`serve`: the ``--view`` server: the roots over HTTP with CORS, plus a viewer from the
    optional ``neuroglancer`` package (``pip install neuroglancer``), until Ctrl-C.

Never imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import os
import sys
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from http import HTTPStatus

import numpy as np

from jaxseg.common import files, outputs
from jaxseg.common.errors import ConfigError, JaxsegError
from jaxseg.io import VolumeError, block_chunks, create_zarr, open_volume

DEFAULT_PORT = 8000
HOST = "127.0.0.1"
LAYOUT_NAME = "neuroglancer.json"
# Besides local viewers (127.0.0.1 / localhost, any port), who may read the served files.
PUBLIC_VIEWERS = ("https://neuroglancer-demo.appspot.com",)
INSTALL_HINT = "the neuroglancer package is not installed: pip install neuroglancer"
# Names a browser uses for this server; any other Host header is a DNS-rebinding attempt (a web
# page whose own domain now resolves to 127.0.0.1) and is refused.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class NeuroglancerMissingError(JaxsegError, ImportError):
  """``--view`` needs the optional ``neuroglancer`` package (the message says how to install)."""


_PROTOCOLS = ((".zarray", "zarr2"), ("zarr.json", "zarr3"), ("attributes.json", "n5"))
_AFFINITY_SHADER = """#uicontrol invlerp normalized
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)),
               toNormalized(getDataValue(2))));
}
"""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer: a name, ``image`` or ``segmentation``, and the local array folder it shows."""

  name: str
  kind: str
  path: str
  visible: bool = True
  rgb: bool = False  # a 3-channel image drawn as RGB (the affinities)


def base_url(port: int = DEFAULT_PORT, host: str = HOST) -> str:
  return f"http://{host}:{int(port)}"


def url_for(path: str, roots: Mapping[str, str], base: str) -> str:
  """The HTTP URL of a local ``path`` under the first root that contains it.

  Raises:
    ValueError: ``path`` lies under none of the roots.
  """
  path = os.path.realpath(path)
  for name, root in roots.items():
    root = os.path.realpath(root)
    if path == root or path.startswith(root + os.sep):
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      return f"{base}/{name}/{urllib.parse.quote(rel)}".rstrip("/.")
  raise ValueError(f"{path} is under none of the served folders {dict(roots)}")


def local_path(url: str, roots: Mapping[str, str]) -> str:
  """Inverse of :func:`url_for` for a layer source URL (``zarr2://http://host/root/rel``)."""
  http_url = url.split("://", 1)[1] if not url.startswith("http") else url
  parts = urllib.parse.urlparse(http_url).path.lstrip("/").split("/", 1)
  root = roots[parts[0]]
  return os.path.join(root, urllib.parse.unquote(parts[1])) if len(parts) > 1 else root


def _protocol(path: str) -> str | None:
  for marker, protocol in _PROTOCOLS:
    if os.path.exists(os.path.join(path, marker)):
      return protocol
  if os.path.exists(os.path.join(path, "info")):
    return "precomputed"
  return None


def _metres(nm: float) -> list:
  return [
    float(nm) / 1e9,
    "m",
  ]  # a division is exact-rounded: 9 nm -> 9e-09, not 9.000000000000001e-09


def _output_dimensions(axis_order: str, resolution: Sequence[float]) -> dict:
  """Names and scales of a source's on-disk axes: ``x``/``y``/``z`` in metres, ``c^`` channels."""
  res = dict(zip("zyx", resolution, strict=True))
  return {("c^" if a == "c" else a): ([1, ""] if a == "c" else _metres(res[a])) for a in axis_order}


def layer_json(layer: Layer, roots: Mapping[str, str], base: str, resolution) -> dict:
  """One Neuroglancer layer (``image`` or ``segmentation``) for a local zarr / n5 array."""
  protocol = _protocol(layer.path)
  if protocol is None:
    raise VolumeError(f"{layer.path}: not a zarr / n5 / precomputed array Neuroglancer can read")
  volume = open_volume(layer.path)
  source = {"url": f"{protocol}://{url_for(layer.path, roots, base)}"}
  if protocol != "precomputed":
    source["transform"] = {"outputDimensions": _output_dimensions(volume.axis_order, resolution)}
  out = {"type": layer.kind, "name": layer.name, "source": source, "visible": layer.visible}
  if layer.kind == "image" and layer.rgb:
    out["shader"] = _AFFINITY_SHADER
  return out


def neuroglancer_state(
  layers: Sequence[Layer],
  roots: Mapping[str, str],
  resolution: Sequence[float],
  shape: Sequence[int],
  *,
  base: str | None = None,
) -> tuple[dict, list[str]]:
  """A Neuroglancer viewer state showing ``layers`` (see the module docstring).

  Args:
    layers: what to show; arrays Neuroglancer cannot read are left out.
    roots: ``{name: local folder}`` served at ``<base>/<name>/``.
    resolution: (z, y, x) nm.
    shape: (z, y, x) voxels; the view starts at the centre.
    base: server URL (default ``http://127.0.0.1:8000``).

  Returns:
    ``(state, skipped)``: the JSON-ready state, and one line per layer left out (why).
  """
  base = base or base_url()
  out_layers, skipped = [], []
  for layer in layers:
    try:
      out_layers.append(layer_json(layer, roots, base, resolution))
    except (VolumeError, ValueError) as e:
      skipped.append(f"{layer.name}: {e}")
  z, y, x = (float(s) / 2 for s in shape)
  res = dict(zip("zyx", resolution, strict=True))
  state = {
    "dimensions": {a: _metres(res[a]) for a in "xyz"},
    "position": [x, y, z],
    "crossSectionScale": 1,
    "layers": out_layers,
    "layout": "4panel",
  }
  if out_layers:
    state["selectedLayer"] = {"visible": True, "layer": out_layers[-1]["name"]}
  return state, skipped


@outputs.writes_outputs
def affinity_display(affinity_source, output: str) -> str:
  """Writes ``[3, z, y, x]`` uint8 (affinity x 255) of the decoded edges into ``output``.

  Args:
    affinity_source: a ``jaxseg.decoding.affinity_io.AffinitySource`` (its ``read(box)`` gives
      the z, y, x edges).
    output: the zarr array folder to write; a complete copy of the same, unchanged source is
      reused, any other copy jaxseg made is replaced.

  Returns:
    ``output``.
  """
  source_path = os.path.abspath(affinity_source.volume.path)
  shape = affinity_source.spatial_shape
  folder, name = os.path.split(os.path.abspath(output))
  entry = outputs.StageOutput(
    folder,
    name=f"display:{name}",
    stage="viewer copy",
    fingerprint={"inputs": {"affinities": outputs.input_identity(source_path)}},
    paths=(name,),
    what="viewer folder",
  )
  # A display copy is made from its source alone: a stale one is replaced, never shown.
  if entry.open(overwrite=True) is outputs.Decision.REUSE:
    return output
  entry.remove_own(name)  # a copy killed midway
  chunks = block_chunks([min(64, s) for s in shape])
  array = create_zarr(
    output,
    (3, *shape),
    np.uint8,
    chunks=(3, *chunks),
    resolution=affinity_source.volume.resolution,
    source=source_path,
    attributes={"jaxseg_display_of": source_path},
  )
  step = chunks[0]
  for z in range(0, shape[0], step):
    box = (slice(z, min(z + step, shape[0])), slice(None), slice(None))
    aff = np.nan_to_num(affinity_source.read(box).astype(np.float32))
    array.write((0, z, 0, 0), np.clip(aff * 255 + 0.5, 0, 255).astype(np.uint8)).result()
  entry.finish()
  return output


def write_layout(path: str, state: dict) -> str:
  """Writes the state as ``path`` (atomically) and returns it."""
  files.write_json(path, state, sort_keys=False)
  return path


# -- serving ------------------------------------------------------------------------------------


def _viewer_origin(origin: str) -> bool:
  """Origins that may read the served files: local viewers and the public Neuroglancer app."""
  try:
    parsed = urllib.parse.urlparse(origin)
    hostname = parsed.hostname
  except ValueError:  # "http://[::1" (an unclosed IPv6 bracket): not a viewer's
    return False
  if parsed.scheme not in ("http", "https"):
    return False
  return hostname in ("127.0.0.1", "localhost") or origin in PUBLIC_VIEWERS


class _BadPath(Exception):
  """A request path that does not decode to a file name (NUL byte, invalid UTF-8): a 400."""


class _RootsHandler(http.server.SimpleHTTPRequestHandler):
  """Static files from named roots (``/<root>/<path>``), readable by local Neuroglancer viewers.

  Only files inside a root are served (``..``, absolute paths and links out of it are 404s; a
  path that does not decode, e.g. with ``%00``, is a 400), only to requests addressed to this
  server by a local name and its port (other ``Host`` headers are 421s: DNS rebinding), and CORS
  admits only local viewers and the public Neuroglancer app: any other web page open in the
  browser cannot read the user's files through this server.
  """

  roots: Mapping[str, str] = {}

  def _host_allowed(self) -> bool:
    port = self.server.server_address[1]
    host = (self.headers.get("Host") or "").strip().lower()
    return host in {f"{name}:{port}" for name in LOCAL_HOSTS}

  def send_head(self):
    # GET and HEAD both start here, before anything is read from disk or sent.
    if not self._host_allowed():
      self.send_error(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host; use 127.0.0.1:<port>")
      return None
    try:
      return super().send_head()
    except _BadPath:
      self.send_error(HTTPStatus.BAD_REQUEST, "bad path")
      return None

  def translate_path(self, path: str) -> str:
    try:
      return self._translate(path)
    except (ValueError, UnicodeError) as e:  # ValueError: "embedded null byte" and friends
      raise _BadPath(str(e)) from e

  def _translate(self, path: str) -> str:
    missing = os.path.join(os.devnull, "missing")  # a 404
    parts = urllib.parse.urlparse(path).path.lstrip("/").split("/", 1)
    name, rel = (urllib.parse.unquote(p, errors="strict") for p in (*parts, "")[:2])
    if "\x00" in name or "\x00" in rel:
      raise _BadPath("NUL in the path")
    root = self.roots.get(name)
    if root is None:
      return missing
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
      return missing
    root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([full, root]) != root:
      return missing
    return full

  def end_headers(self) -> None:
    origin = self.headers.get("Origin", "")
    if origin and _viewer_origin(origin):
      self.send_header("Access-Control-Allow-Origin", origin)
      self.send_header("Vary", "Origin")
    super().end_headers()

  def log_message(self, *args) -> None:  # chunk requests would flood the terminal
    pass


class _FileServer(http.server.ThreadingHTTPServer):
  """The threaded server, quiet about viewers that hang up mid-file."""

  def handle_error(self, request, client_address) -> None:
    # Neuroglancer drops chunk requests it no longer needs (the user moved on): not an error,
    # and a traceback per dropped chunk would flood the terminal. Anything else is still shown.
    if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      return
    super().handle_error(request, client_address)


def start_file_server(roots: Mapping[str, str], port: int = DEFAULT_PORT, host: str = HOST):
  """Serves ``roots`` over HTTP on a daemon thread; returns ``(server, base_url)``.

  ``port=0`` picks a free port.
  """
  handler = type("Handler", (_RootsHandler,), {"roots": dict(roots)})
  try:
    server = _FileServer((host, int(port)), handler)
  except OSError as e:  # the port is taken (or not ours to bind)
    raise ConfigError(
      f"--view_port={port}: cannot serve on {host}:{port} ({e.strerror or e}); try another "
      "--view_port (0 = any free port)"
    ) from e
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, base_url(server.server_address[1], host)


def serve(state_for_base, roots: Mapping[str, str], *, port: int = DEFAULT_PORT, wait=None) -> str:
  """``--view``: serves the roots and opens a Neuroglancer viewer on them until Ctrl-C.

  Args:
    state_for_base: ``f(base_url) -> state`` (the layout with the server's actual URL).
    roots: folders to serve.
    port: the file server's port (0 = any free one).
    wait: a callable that blocks until the user is done (default: until Ctrl-C).

  Returns:
    The viewer URL.

  Raises:
    NeuroglancerMissingError: the ``neuroglancer`` package is missing (an ``ImportError``; the
      message says how to install it).
    ConfigError: the port is taken.
  """
  try:
    import neuroglancer
  except ImportError as e:
    raise NeuroglancerMissingError(INSTALL_HINT) from e
  server, base = start_file_server(roots, port)
  try:
    neuroglancer.set_server_bind_address(HOST)
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(state_for_base(base)))
    url = str(viewer)
    print(f"neuroglancer: {url}  (files from {base}; Ctrl-C to stop)", flush=True)
    (wait or functools.partial(_wait_forever))()
  finally:
    server.shutdown()
  return url


def _wait_forever() -> None:
  with contextlib.suppress(KeyboardInterrupt):
    threading.Event().wait()
