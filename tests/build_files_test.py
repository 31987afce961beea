"""Keeps the Bazel BUILD files honest, since Bazel itself cannot run on our machines.

Checks, by parsing every ``BUILD.bazel`` (Starlark is a syntactic subset of Python):

* every ``.py`` file under ``jaxseg/``, ``configs/``, ``tests/`` and ``benchmarks/`` is in the
  ``srcs`` of exactly one target, and every listed source exists;
* every first-party import that crosses targets (``jaxseg.io`` from ``jaxseg.metrics``, say) is a
  declared dep, and so is every third-party import (``//third_party:numpy``);
* every dep names a target that exists.
"""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("jaxseg", "configs", "tests", "benchmarks")
RULES = ("py_library", "py_binary", "py_test")


def _build_files():
  return sorted(p for p in REPO.rglob("BUILD.bazel") if ".venv" not in p.parts)


def _targets():
  """{label: {"srcs": [Path], "deps": [label], "file": Path}} over all BUILD files."""
  targets = {}
  for build in _build_files():
    package = build.parent.relative_to(REPO).as_posix()
    package = "" if package == "." else package
    tree = ast.parse(build.read_text(), filename=str(build))
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in RULES):
        continue
      kwargs = {
        k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg in ("name", "srcs", "deps")
      }
      label = f"//{package}:{kwargs['name']}"
      assert label not in targets, f"{build}: duplicate target {label}"
      targets[label] = {
        "srcs": [build.parent / s for s in kwargs.get("srcs", [])],
        "deps": [_absolute(d, package) for d in kwargs.get("deps", [])],
        "file": build,
      }
  return targets


def _absolute(label: str, package: str) -> str:
  if label.startswith(":"):
    return f"//{package}{label}"
  if ":" not in label:  # //jaxseg/io is short for //jaxseg/io:io
    return f"{label}:{label.rsplit('/', 1)[-1]}"
  return label


def _python_files():
  files = set()
  for root in SOURCE_ROOTS:
    files |= {p for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts}
  return files


def _imports(path: Path):
  """Absolute module names imported by a file (``from a import b`` yields ``a.b`` and ``a``)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module
      for alias in node.names:
        yield f"{node.module}.{alias.name}"


def _first_party_file(module: str) -> Path | None:
  parts = module.split(".")
  base = REPO.joinpath(*parts)
  if base.with_suffix(".py").exists():
    return base.with_suffix(".py")
  if (base / "__init__.py").exists():
    return base / "__init__.py"
  return None


def test_build_files_exist():
  assert (REPO / "WORKSPACE").exists()
  assert (REPO / "BUILD.bazel").exists()
  assert _targets(), "no py_library / py_binary / py_test targets found"


def test_every_python_file_is_in_exactly_one_target():
  owners = {}
  for label, target in _targets().items():
    for src in target["srcs"]:
      assert src.exists(), f"{target['file']}: {label} lists {src.relative_to(REPO)}, missing"
      owners.setdefault(src.resolve(), []).append(label)
  unowned = sorted(str(p.relative_to(REPO)) for p in _python_files() if p.resolve() not in owners)
  assert not unowned, f"files in no BUILD target: {unowned}"
  shared = {str(p.relative_to(REPO)): ls for p, ls in owners.items() if len(ls) > 1}
  assert not shared, f"files in more than one target: {shared}"


def test_every_dep_exists():
  targets = _targets()
  for label, target in targets.items():
    for dep in target["deps"]:
      assert dep in targets, f"{target['file']}: {label} depends on unknown target {dep}"


def test_imports_are_declared_deps():
  targets = _targets()
  owner = {src.resolve(): label for label, t in targets.items() for src in t["srcs"]}
  stdlib = set(sys.stdlib_module_names)
  problems = []
  for label, target in targets.items():
    declared = set(target["deps"])
    for src in target["srcs"]:
      for module in _imports(src):
        top = module.split(".")[0]
        if top in stdlib or top == "__future__":
          continue
        if top in ("jaxseg", "configs"):
          file = _first_party_file(module)
          if file is None:
            continue  # ``from jaxseg.io import open_volume``: the module itself is checked
          dep = owner.get(file.resolve())
          if dep and dep != label and dep not in declared:
            problems.append(f"{label} ({src.relative_to(REPO)}) imports {module}: add {dep}")
        elif (src.parent / f"{top}.py").exists():  # a helper beside the test (cli_asserts)
          dep = owner.get((src.parent / f"{top}.py").resolve())
          if dep and dep != label and dep not in declared:
            problems.append(f"{label} ({src.relative_to(REPO)}) imports {top}: add {dep}")
        else:
          dep = f"//third_party:{top}"
          if dep not in declared:
            problems.append(f"{label} ({src.relative_to(REPO)}) imports {top}: add {dep}")
  assert not problems, "undeclared deps:\n" + "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("stub", ["numpy", "jax", "tensorstore", "waterz"])
def test_third_party_stubs_name_their_pip_package(stub):
  text = (REPO / "third_party" / "BUILD.bazel").read_text()
  assert f'name = "{stub}"' in text
