"""The package's import structure: no cycles, the library never imports its tools, no module
imports another module's underscore names (read from the source with ``ast``, lazy imports
inside functions included)."""

import ast
from pathlib import Path

import pytest

import crossget

ROOT = Path(crossget.__file__).parent
TOOLS = "crossget.tools"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` for every crossget import in the file (relative ones resolved)."""
    name = module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "crossget"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package_of(name, path).split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "crossget":
                out.append((base, [a.name for a in node.names], node.lineno))
    return out


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(target: str, names: list[str]) -> list[str]:
    """The modules an import statement depends on: ``from pkg import mod`` names a module."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return found if found and len(found) == len(names) else [target] + found


def graph() -> dict[str, set[str]]:
    return {
        name: {dep for target, names, _ in imports(path) for dep in resolve(target, names) if dep != name}
        for name, path in MODULES.items()
    }


def test_the_walk_sees_the_package():
    g = graph()
    assert "crossget.api" in g and "crossget.tools.cli" in g
    assert "crossget.families.registry" in g["crossget.api"]


def test_no_import_cycles():
    g = graph()
    done, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if dep in g:
                visit(dep)
        stack.pop()
        done.add(node)

    for node in sorted(g):
        visit(node)
    # a package's __init__ re-exporting its submodules is not a cycle of the code
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_the_library_never_imports_its_tools():
    bad = [
        f"{name}:{line} imports {target}"
        for name, path in MODULES.items()
        if not (name == TOOLS or name.startswith(TOOLS + "."))
        for target, _, line in imports(path)
        if target == TOOLS or target.startswith(TOOLS + ".")
    ]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_underscore_names():
    bad = [
        f"{name}:{line} takes {n} from {target}"
        for name, path in MODULES.items()
        for target, names, line in imports(path)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.py")), ids=lambda p: module_name(p))
def test_comments_cite_the_projects_own_method_document(path):
    """Comments point at docs/method.md, which ships with the code, not at an outside spec."""
    assert "SPEC §" not in path.read_text(), f"{path} cites SPEC §: cite docs/method.md §N"
