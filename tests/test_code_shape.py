"""The shape of the code in atu/ and serve/: short functions with few parameters, no import cycles, and no module
reaching for another module's private names. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("atu", "serve")
MAX_LINES = 60
MAX_PARAMS = 8  # self/cls not counted; *args and **kwargs count one each

# Functions allowed over a limit, by "module:qualified name": none now; keep it that way.
ALLOWED_LONG: set[str] = set()
ALLOWED_WIDE: set[str] = set()


def _modules(packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every module of ``packages``."""
    out = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _functions(tree: ast.Module):
    """(qualified name, node) of every function and method, nested ones included."""

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _is_click_command(fn: ast.FunctionDef) -> bool:
    """Decorated by click (or by a project decorator that adds click options): its parameters are its options."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        text = ast.unparse(target)
        if "click" in text or text.endswith((".command", ".group", "_options")):
            return True
    return False


def _n_params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args] + [p.arg for p in a.kwonlyargs]
    n = len([x for x in names if x not in ("self", "cls")])
    return n + (a.vararg is not None) + (a.kwarg is not None)


def _shape_problems() -> tuple[list[str], list[str]]:
    long, wide = [], []
    for mod, path in _modules().items():
        for name, fn in _functions(ast.parse(path.read_text(), str(path))):
            key = f"{mod}:{name}"
            lines = fn.end_lineno - fn.lineno + 1
            if _is_click_command(fn):  # a command's body is its options' wiring, and its parameters are its options
                continue
            if lines > MAX_LINES and key not in ALLOWED_LONG:
                long.append(f"{key} has {lines} lines")
            if _n_params(fn) > MAX_PARAMS and key not in ALLOWED_WIDE:
                wide.append(f"{key} has {_n_params(fn)} parameters")
    return long, wide


def test_functions_are_short():
    long, _ = _shape_problems()
    assert not long, f"functions over {MAX_LINES} lines (split them): {long}"


def test_functions_take_few_parameters():
    _, wide = _shape_problems()
    assert not wide, f"functions over {MAX_PARAMS} parameters (group them in a dataclass): {wide}"


def test_allow_lists_name_only_real_offenders():
    """An allow-list entry whose function got shorter (or went away) is dropped, so the lists only shrink."""
    seen_long, seen_wide = set(), set()
    for mod, path in _modules().items():
        for name, fn in _functions(ast.parse(path.read_text(), str(path))):
            if fn.end_lineno - fn.lineno + 1 > MAX_LINES:
                seen_long.add(f"{mod}:{name}")
            if _n_params(fn) > MAX_PARAMS:
                seen_wide.add(f"{mod}:{name}")
    assert ALLOWED_LONG <= seen_long, f"no longer over the limit, drop from ALLOWED_LONG: {ALLOWED_LONG - seen_long}"
    assert ALLOWED_WIDE <= seen_wide, f"no longer over the limit, drop from ALLOWED_WIDE: {ALLOWED_WIDE - seen_wide}"


def _resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``import from`` names."""
    if not node.level:
        return node.module or ""
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _module_imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``mod`` imports at module level (not inside functions, not under TYPE_CHECKING)."""
    out = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, path, node)
            for a in node.names:
                if f"{base}.{a.name}" in known:  # `from atu import envs` imports the module atu.envs
                    out.add(f"{base}.{a.name}")
                elif base in known:
                    out.add(base)
    out.discard(mod)
    return out


def test_no_import_cycles():
    known = _modules()
    graph = {m: _module_imports(m, p, known) for m, p in known.items()}
    # A package's __init__ importing its own modules is how a package exposes them, not a cycle between modules.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d in PACKAGES and m.startswith(d + "."))}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def _private_imports(path: Path, mod: str) -> list[str]:
    """``from atu.x import _name`` and ``atu.x._name`` uses, in ``path``, of a module other than its own."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(mod, path, node)
            if base.split(".")[0] not in PACKAGES or base == mod:
                continue
            found += [f"{path.relative_to(ROOT)}: from {base} import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = ast.unparse(node.value)
            if owner.split(".")[0] in PACKAGES and owner != mod:
                found.append(f"{path.relative_to(ROOT)}: {owner}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_across_modules():
    files = dict(_modules())
    for extra in ("tests", "benchmarks"):
        for path in sorted((ROOT / extra).rglob("*.py")):
            files[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    found = [hit for mod, path in files.items() for hit in _private_imports(path, mod)]
    assert not found, f"private names used outside their module (give them a public name): {found}"
