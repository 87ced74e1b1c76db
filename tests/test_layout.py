"""The package's layers: the arrows point one way, and no module imports another's private names.

- the numerics core (formats, quantize, packing, specs, recipes, state, backends, layers) and the
  Triton kernels import neither Lightning nor the scaling, demo or Lightning glue packages;
- the scaling package imports no Lightning when it is imported (the sweep runner starts
  training inside a function);
- ``lightning_fpq/lightning/`` is the only package whose modules import Lightning at import time,
  besides the demo (which is an application of the library).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_fpq"
CORE = (
    sorted(p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    + sorted((PACKAGE / "backends").glob("*.py"))
    + sorted((ROOT / "kernels").glob("*.py"))
)
LIGHTNING = ("lightning", "pytorch_lightning")


def _imports(path: Path, *, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, relative level) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = path.parent.relative_to(ROOT).parts
    if package and package[0] == "kernels":
        package = ("lightning_fpq", "kernels")
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, [], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names], node.level))
    return found


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")[1:]
    if parts[:1] == ["kernels"]:
        return (ROOT.joinpath(*parts).with_suffix(".py")).exists()
    return PACKAGE.joinpath(*parts).with_suffix(".py").exists()


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", CORE, ids=_name)
def test_the_core_knows_nothing_of_lightning_scaling_or_demo(path):
    for module, _, _ in _imports(path, top_level_only=False):
        top = module.split(".")[0]
        assert top not in LIGHTNING, (_name(path), module)
        assert not module.startswith(
            ("lightning_fpq.lightning", "lightning_fpq.scaling", "lightning_fpq.demo", "lightning_fpq.cli")
        ), (_name(path), module)


@pytest.mark.parametrize("path", sorted((PACKAGE / "scaling").glob("*.py")), ids=_name)
def test_scaling_imports_no_lightning_at_import_time(path):
    for module, _, _ in _imports(path, top_level_only=True):
        assert module.split(".")[0] not in LIGHTNING, (_name(path), module)
        assert not module.startswith("lightning_fpq.lightning"), (_name(path), module)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")), ids=_name)
def test_no_module_imports_another_modules_private_names(path):
    own = (
        ".".join(("lightning_fpq",) + path.relative_to(PACKAGE).with_suffix("").parts)
        if path.is_relative_to(PACKAGE)
        else f"lightning_fpq.kernels.{path.stem}"
    )
    for module, names, _ in _imports(path, top_level_only=False):
        if not module.startswith("lightning_fpq") or module == own:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        # a package's own private helper module (``kernels/_common.py``) is shared within that package
        private = [n for n in private if not (module + "." + n).startswith(own.rsplit(".", 1)[0] + "._")]
        # a package-internal module (``lightning_fpq._config``) is meant to be imported across the package
        private = [n for n in private if not _is_module(f"{module}.{n}")]
        assert not private, (_name(path), module, private)
