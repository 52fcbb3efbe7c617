"""The layers of docs/ARCHITECTURE.md hold: a module imports only from its own layer or the layers
below it, at the top of the file or inside a function alike."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lpcgma"
# bottom to top, as docs/ARCHITECTURE.md lists them
LAYERS = [
    *("config_values", "config", "search_space", "comm", "storage", "data", "models", "losses", "prototypes"),
    *("methods", "engine", "tracking", "distributed", "cli"),
]


def layer_of(module: str) -> int:
    """The layer index of a dotted module name under lpcgma (``lpcgma.engine.trainer`` → engine)."""
    parts = module.split(".")
    assert parts[0] == "lpcgma", module
    name = parts[1] if len(parts) > 1 else ""
    return LAYERS.index(name) if name in LAYERS else -1  # -1: the package root (__init__, version)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lpcgma import in `path`, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lpcgma"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.split(".")[0] == "lpcgma":
                found.append((node.lineno, name))
    return found


def test_the_layer_list_names_every_subpackage() -> None:
    tops = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("_")}
    tops = {t for t in tops if (PACKAGE / f"{t}.py").is_file() or any((PACKAGE / t).glob("*.py"))}
    assert tops <= set(LAYERS), tops - set(LAYERS)
    architecture = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    positions = [architecture.index(f"lpcgma/{name}") for name in LAYERS]
    assert positions == sorted(positions), "docs/ARCHITECTURE.md lists the layers in another order"


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(module_name(path))
        for line, imported in imported_modules(path):
            if layer_of(imported) > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert not upward, "\n".join(upward)
