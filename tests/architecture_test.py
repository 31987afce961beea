"""The layout shows the architecture: layers, no upward imports, no import cycles.

Every ``import`` in ``jaxseg/`` is read with ``ast``, at module level and inside functions alike
(an import moved into a function to dodge a cycle is still a dependency). Layers, bottom to top::

  common -> io -> data, models, metrics, synthesis -> training, inference, decoding, quality
  -> tuning -> workflow -> the entry points (jaxseg/<program>.py)

A module may import its own layer or any layer below; library code never imports an entry point.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jaxseg"

LAYERS = (
  ("common",),
  ("io",),
  ("data", "models", "metrics", "synthesis"),
  ("training", "inference", "decoding", "quality"),
  ("tuning",),
  ("workflow",),
)
ENTRY_LAYER = len(LAYERS)


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
  parts = module.split(".")
  if len(parts) == 1:
    return -1  # the jaxseg package itself: imports nothing
  if len(parts) == 2 and parts[1] not in {p for layer in LAYERS for p in layer}:
    return ENTRY_LAYER  # jaxseg/<program>.py
  for level, packages in enumerate(LAYERS):
    if parts[1] in packages:
      return level
  raise AssertionError(f"{module}: its package is in no layer; add it to LAYERS")


def _imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
  """The jaxseg modules ``path`` imports, resolved to modules that exist."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base])
        base = base.rstrip(".")
      # `from jaxseg.models import layers` names the module jaxseg.models.layers;
      # `from jaxseg.io import open_volume` names jaxseg.io.
      names = [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
        for alias in node.names
      ]
    for name in names:
      if not name.startswith("jaxseg"):
        continue
      # The longest prefix that is a module: `from jaxseg.io import open_volume` -> jaxseg.io.
      parts = name.split(".")
      while parts and ".".join(parts) not in modules:
        parts.pop()
      if parts and ".".join(parts) != module:
        found.add(".".join(parts))
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, m, modules) for m, p in modules.items()}


def test_no_module_imports_a_layer_above_it():
  upward = []
  for module, imported in sorted(_graph().items()):
    for other in sorted(imported):
      if other == "jaxseg":
        continue
      if _layer(other) > _layer(module):
        upward.append(f"{module} -> {other}")
  assert not upward, "upward imports:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
  graph = _graph()
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in graph or nxt == "jaxseg":
        continue
      if state.get(nxt) == "open":
        cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [])
  assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_files_and_functions_stay_small():
  """No file over 800 lines, no function over 120 (numba kernels included)."""
  long_files, long_functions = [], []
  for path in sorted(PACKAGE.rglob("*.py")):
    text = path.read_text()
    if text.count("\n") > 800:
      long_files.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 120:
          long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length}")
  assert not long_files and not long_functions, "\n  ".join(
    ["too long:", *long_files, *long_functions]
  )
