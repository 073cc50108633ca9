"""The map in docs/architecture.md, checked: rooms, the one way imports run, module sizes.

Every import counts, those under ``if TYPE_CHECKING:`` and inside functions
too: a cycle that only the type checker sees still ties two rooms together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "redcredit"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# The foundation: plain values, validation and settings that every room may use.
FOUNDATION = frozenset(
    {"errors", "results", "validation", "secrets", "costs", "config", "plans", "scopes"}
)
# A room may import rooms of a lower rank, and itself; never a room of its own
# rank or above (clients and ledger stand side by side and know nothing of each other).
RANKS = {
    "foundation": 0,
    "core": 1,
    "backends": 2,
    "clients": 3,
    "ledger": 3,
    "servers": 3,
    "http": 4,
    "demo": 5,
    "cli": 6,
    "api": 7,
}
GENERATED = frozenset({"redcredit/clients/sync_client.py"})
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] in FOUNDATION:
        return "foundation"
    return parts[1]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
        if not base.startswith("redcredit"):
            return []
        targets = [base]
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *(node.module or "").split(".")]).strip(".")
        targets = [base]
    found = []
    for target in targets:
        for alias in node.names:
            # `from .. import validation` names a module; `from .x import y` a name in x.
            child = f"{target}.{alias.name}"
            found.append(child if child in MODULES else target)
    return found


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, path.name == "__init__.py", node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("redcredit"))
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_belongs_to_a_known_room() -> None:
    unknown = sorted(m for m in MODULES if room(m) not in RANKS)
    assert unknown == [], f"not in any room of docs/architecture.md: {unknown}"


def test_the_top_level_holds_only_the_public_surface_and_the_rooms() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    allowed = FOUNDATION | {"cli"}
    assert top <= allowed, top - allowed
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(RANKS), folders - set(RANKS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module: str) -> None:
    mine = room(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        theirs = room(target)
        if theirs == mine:
            continue
        if RANKS[theirs] >= RANKS[mine]:
            wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_no_import_cycle() -> None:
    # Package __init__ files re-export their room: an edge into one is an edge to what it holds.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if target == "redcredit":
                continue  # the package itself is imported first by every submodule
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize(
    "path",
    sorted([*PACKAGE.rglob("*.py"), *(ROOT / "bench").rglob("*.py")]),
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_no_module_passes_its_size(path: Path) -> None:
    relative = path.relative_to(ROOT).as_posix()
    if relative in GENERATED:
        pytest.skip("generated from its async twin")
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{relative} has {lines} lines: split it by concept"


def test_the_bench_entry_point_is_short() -> None:
    main = ROOT / "bench" / "__main__.py"
    assert len(main.read_text().splitlines()) <= 120


def test_architecture_doc_names_every_module() -> None:
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)*\.py)`", text))
    missing = []
    for module, path in MODULES.items():
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" and module != "redcredit":
            continue
        if relative not in named:
            missing.append(relative)
    assert missing == [], f"docs/architecture.md does not name {missing}"
    stale = sorted(n for n in named if not (PACKAGE / n).exists() and not (ROOT / n).exists())
    assert stale == [], f"docs/architecture.md names files that do not exist: {stale}"
