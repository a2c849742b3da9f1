"""The package's layers import only downwards.

native -> options -> metrics -> spec -> backends -> stages (with ann) -> functional -> nn -> models ->
data / viz -> train -> bench / verify -> cli, with utils below everything. Imports are read from the source with ``ast`` (those
inside functions too), so a lazy import that runs backwards is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "convnn"

# the core's layers, lowest first; a layer imports only from the layers before it (the
# candidates stage and the ANN index it calls form one layer)
CORE = (
    ("convnn.native",),  # the compiled kernels' wrapper: torch and its extension only
    ("convnn.options",),
    ("convnn.metrics",),
    ("convnn.spec",),
    ("convnn.backends",),
    ("convnn.stages", "convnn.ann"),
    ("convnn.functional",),
    ("convnn.nn",),
    ("convnn.models",),
)
APP = ("convnn.data", "convnn.viz", "convnn.train", "convnn.bench", "convnn.verify", "convnn.cli")

# module prefix -> the prefixes it must not import
FORBIDDEN = {
    "convnn.utils": ("convnn.",),
    **{
        member: tuple(m for later in CORE[i + 1 :] for m in later) + APP
        for i, layer in enumerate(CORE)
        for member in layer
    },
    "convnn.data": ("convnn.train", "convnn.viz", "convnn.bench", "convnn.verify", "convnn.cli"),
    "convnn.viz": ("convnn.train", "convnn.data", "convnn.bench", "convnn.verify", "convnn.cli"),
    "convnn.train": ("convnn.bench", "convnn.verify", "convnn.cli"),
    "convnn.bench": ("convnn.train", "convnn.cli"),
    "convnn.verify": ("convnn.train", "convnn.cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, name: str, is_package: bool) -> set[str]:
    """Every convnn module the code of module ``name`` imports (absolute names, relative ones
    resolved), at the top or inside functions."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "convnn" or m.startswith("convnn.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


def _under(module: str, prefix: str) -> bool:
    return module == prefix.rstrip(".") or module.startswith(prefix.rstrip(".") + ".")


def _violations(name: str, imported: set[str]) -> list[str]:
    bad = []
    if not _under(name, "convnn.cli"):
        bad += [f"{m} (nothing imports cli)" for m in imported if _under(m, "convnn.cli")]
    for owner, forbidden in FORBIDDEN.items():
        if _under(name, owner):
            bad += sorted(m for m in imported for f in forbidden if _under(m, f))
    return bad


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_imports_run_downwards(path):
    name = _module_name(path)
    imported = _imports(path.read_text(), name, path.name == "__init__.py")
    assert not _violations(name, imported), f"{name} imports {_violations(name, imported)}"


def test_the_check_sees_relative_and_lazy_imports():
    source = "def f():\n    from ..train.checkpoint import x\n    import convnn.cli\n"
    imported = _imports(source, "convnn.viz.curves", is_package=False)
    assert {"convnn.train.checkpoint", "convnn.cli"} <= imported
    assert _violations("convnn.viz.curves", imported)
    assert not _violations("convnn.cli.train", _imports(source, "convnn.cli.train", False))


def test_no_module_shadows_the_standard_library():
    import sys

    shadowing = [p for p in MODULES if p.stem in sys.stdlib_module_names]
    assert not shadowing
