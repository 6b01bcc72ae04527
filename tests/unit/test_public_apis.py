"""The proxy uses its libraries (the standard library's included) through their public APIs:
no private attribute of another module, no override of a library class's private method, no
introspection of bound methods (`__self__`). Read from the source (AST), so a new use fails
here before it breaks on a library's next release.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PROXY = Path(__file__).resolve().parents[2] / "operator" / "kubepeer" / "proxy"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def foreign_names(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None) for every import of a module outside
    kubepeer, at any depth (imports inside functions too)."""
    names: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not alias.name.startswith("kubepeer"):
                    local = alias.asname or alias.name.split(".")[0]
                    names[local] = ((alias.asname and alias.name) or local, None)
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
              and not node.module.startswith("kubepeer")):  # fmt: skip
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
    return names


def _resolve(base: ast.expr, foreign: dict[str, tuple[str, str | None]]) -> object | None:
    """The library class a class statement's base names (`Protocol`, `uvicorn.Server`)."""
    chain = []
    while isinstance(base, ast.Attribute):
        chain.insert(0, base.attr)
        base = base.value
    if not (isinstance(base, ast.Name) and base.id in foreign):
        return None
    module, attribute = foreign[base.id]
    found = importlib.import_module(module)
    for name in [attribute, *chain] if attribute else chain:
        found = getattr(found, name)
    return found


def uses(path: Path) -> set[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    foreign = foreign_names(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == "__self__":
                found.add((path.name, "reads __self__"))
            elif (isinstance(node.value, ast.Name) and node.value.id in foreign
                  and _private(node.attr)):  # fmt: skip
                found.add((path.name, f"reads {node.value.id}.{node.attr}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant)):  # fmt: skip
            name = str(node.args[1].value)  # the same reads, spelled as getattr(x, "name")
            if name == "__self__":
                found.add((path.name, "reads __self__"))
            elif _private(name):
                found.add((path.name, f"reads {name} by {node.func.id}"))
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                cls = _resolve(base, foreign)
                if cls is None:
                    continue
                for item in ast.walk(node):
                    name = None
                    if isinstance(item, ast.FunctionDef):
                        name = item.name
                    elif isinstance(item, ast.Attribute):
                        name = item.attr
                    if name and _private(name) and hasattr(cls, name):
                        verb = "overrides" if isinstance(item, ast.FunctionDef) else "reads"
                        found.add((path.name, f"{verb} {ast.unparse(base)}.{name}"))
    return found


def test_the_proxy_touches_no_private_attribute_of_another_library():
    found = set().union(*(uses(path) for path in sorted(PROXY.rglob("*.py"))))
    assert found == set(), f"private APIs used: {sorted(found)}"


def test_the_guard_sees_each_kind_of_use(tmp_path):
    """The scan itself, on code that does each thing it must catch."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import logging\n"
        "from logging import Logger\n"
        "logging._srcfile = None\n"
        "class Quiet(logging.Logger):\n"
        "    def _log(self, *args):\n"
        "        return None\n"
        "class Loud(Logger):\n"
        "    def info(self, msg):\n"
        "        return self._log(20, msg, ())\n"
        "def f(receive):\n"
        "    return receive.__self__, getattr(receive, '_cycle', None)\n"
    )
    assert uses(sample) == {
        ("sample.py", "reads logging._srcfile"),
        ("sample.py", "overrides logging.Logger._log"),
        ("sample.py", "reads Logger._log"),
        ("sample.py", "reads __self__"),
        ("sample.py", "reads _cycle by getattr"),
    }
