"""The house's rules, read from the code (docs/DESIGN.md, "The map"): every import between kdcache's
packages points down (pipeline/ < storage/ < teacher/ < student/), no module imports itself back
through others, and no kdcache import hides inside a function (a lazy import of our own code is
how a back-edge hides; lazy imports are for optional or heavy third-party packages only).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"pipeline": 1, "storage": 2, "teacher": 3, "student": 4}


def modules() -> dict[str, Path]:
    out = {}
    for room in FLOORS:
        for path in sorted((REPO / room).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def kdcache_imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of a kdcache module in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                if name.split(".")[0] in FLOORS:
                    # the longest known module the name starts with (`from pipeline import urls` -> pipeline.urls)
                    target = max((m for m in known if name == m or name.startswith(m + ".")), key=len, default=None)
                    if target is not None:
                        found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return sorted(set(found))


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    mods = modules()
    return mods, {m: kdcache_imports(p, set(mods)) for m, p in mods.items()}


def test_every_import_between_rooms_points_down():
    mods, edges = graph()
    up = [f"{mods[m].relative_to(REPO)}:{line} imports {t} (floor {FLOORS[t.split('.')[0]]} > "
          f"{FLOORS[m.split('.')[0]]})"
          for m, targets in edges.items() for t, line, _ in targets
          if FLOORS[t.split(".")[0]] > FLOORS[m.split(".")[0]]]
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_no_circles_between_modules():
    mods, edges = graph()
    succ = {m: sorted({t for t, _, _ in targets if t != m and not m.startswith(t + ".")})
            for m, targets in edges.items()}
    # a package's __init__ is imported on the way to its modules: an arrow into it is not a circle's
    # edge unless __init__ itself imports back (it is then a module like any other)
    state: dict[str, int] = {}
    circles = []

    def dfs(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in succ.get(m, []):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                dfs(t, path + [t])
        state[m] = 2

    for m in sorted(succ):
        if m not in state:
            dfs(m, [m])
    assert not circles, "modules that import each other in a loop:\n" + "\n".join(circles)


def test_no_lazy_import_of_kdcache_code():
    mods, edges = graph()
    lazy = [f"{mods[m].relative_to(REPO)}:{line} imports {t} inside a function"
            for m, targets in edges.items() for t, line, inside in targets if inside]
    assert not lazy, "lazy imports of kdcache modules (move the code instead):\n" + "\n".join(lazy)


def test_no_room_holds_more_than_30_percent_of_the_code():
    lines = {room: sum(len(p.read_text().splitlines()) for p in (REPO / room).rglob("*.py"))
             for room in (*FLOORS, "bench", "scripts")}
    total = sum(lines.values())
    big = {room: f"{n / total:.0%}" for room, n in lines.items() if n > 0.3 * total}
    assert not big, f"rooms over 30 % of {total} lines: {big}"


def test_old_commands_refuse_naming_the_new_ones():
    import subprocess
    import sys

    for old, new in (("pipeline.cache", "teacher.cache"), ("pipeline.audit", "teacher.audit")):
        proc = subprocess.run([sys.executable, "-m", old, "--config", "x.yaml"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and f"python -m {new} --config x.yaml" in proc.stderr, (old, proc.stderr)
        # `ray submit cluster.yaml pipeline/cache.py ...` runs the file as a script: the same answer
        proc = subprocess.run([sys.executable, str(REPO / old.replace(".", "/")) + ".py"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and f"python -m {new}" in proc.stderr, (old, proc.stderr)
