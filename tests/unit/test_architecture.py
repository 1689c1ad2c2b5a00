"""The dependency rules of docs/design.md ("Layers"), checked on every import in src/.

The imports are read with ``ast`` (nothing is imported to find them), including the ones
inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.

:data:`KNOWN_VIOLATIONS` lists, as patterns of importing and imported module, the imports
that break a rule today (none since phase 2 of issue 11 moved what composes runtime and net
into :mod:`corral.lifecycle`). The test fails on any violation not listed, and on a listed one
that no longer happens, so the list can only shrink and always says what is left.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import pkgutil
import re
from pathlib import Path

import corral
from corral.errors import CorralError

SRC = Path(corral.__file__).resolve().parent
DESIGN = SRC.parent.parent / "docs" / "design.md"

#: Layer -> the layers it may import (besides itself). A layer is a subpackage of corral
#: (``corral.net``) or a top-level module (``corral.errors``); ``corral`` itself and
#: ``corral.sync`` are the public facade. Kept equal to docs/design.md's table.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "paths": frozenset(),
    "kernel": frozenset(),
    "config": frozenset({"errors"}),
    "policy": frozenset({"config", "errors"}),
    "net": frozenset({"policy", "config", "kernel", "paths", "errors"}),
    "runtime": frozenset({"policy", "config", "kernel", "paths", "errors"}),
    "lifecycle": frozenset({"runtime", "net", "policy", "config", "kernel", "paths", "errors"}),
    "sdk": frozenset({"lifecycle", "policy", "config", "errors"}),
    "cli": frozenset({"sdk", "lifecycle", "policy", "config", "errors"}),
    "facade": frozenset({"sdk", "policy", "config", "errors"}),
}

#: Imports that break a rule today, as (importer, imported) ``fnmatch`` patterns of module
#: names, each with why and what removes it. Empty since phase 2 of issue 11 (the lifecycle
#: package): an entry may only be added with its reason and the work that removes it.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def _excused(violation: tuple[str, str]) -> tuple[str, str] | None:
    for pattern in KNOWN_VIOLATIONS:
        if fnmatch.fnmatchcase(violation[0], pattern[0]) and fnmatch.fnmatchcase(
            violation[1], pattern[1]
        ):
            return pattern
    return None


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "sync":
        return "facade"
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = SRC.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Every corral module that ``path`` (the module ``module``) imports, as a dotted name."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                found.add(sub if _is_module(sub) else origin)
    # ``import corral`` alone (for ``corral.__file__``) is no dependency: every module imports
    # the package root anyway, and its ``__init__`` imports nothing eagerly.
    return {name for name in found if name.startswith("corral.")}


def _all_imports() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _violations() -> set[tuple[str, str]]:
    out = set()
    for importer, imported in _all_imports().items():
        mine = _layer(importer)
        for target in imported:
            theirs = _layer(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                out.add((importer, target))
    return out


def test_every_layer_has_a_rule() -> None:
    layers = {_layer(m) for m in _all_imports()}
    assert layers <= set(MAY_IMPORT), layers - set(MAY_IMPORT)


def test_imports_follow_the_layer_rules() -> None:
    new = {v for v in _violations() if _excused(v) is None}
    assert not new, (
        "imports against docs/design.md's layer rules (fix them, or if they are part of a "
        f"planned move, list them in KNOWN_VIOLATIONS with the reason): {sorted(new)}"
    )


def test_known_violations_still_exist() -> None:
    gone = KNOWN_VIOLATIONS - {_excused(v) for v in _violations()}
    assert not gone, f"no longer violated: delete from KNOWN_VIOLATIONS: {sorted(gone)}"


def test_net_and_runtime_do_not_import_each_other_beyond_the_list() -> None:
    """The rule issue 11 is about, spelled out: after phase 2 both directions are empty."""
    crossing = {
        (a, b)
        for a, b in _violations()
        if {_layer(a), _layer(b)} == {"net", "runtime"}
    }
    assert not crossing, sorted(crossing)


def test_the_walker_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """A rule checker that misses imports cannot fail: show it finds each form."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from __future__ import annotations\n"
        "import corral\n"
        "TYPE_CHECKING = False\n"
        "if TYPE_CHECKING:\n"
        "    from corral.sdk import sandbox\n"
        "def f() -> None:\n"
        "    import corral.cli.main\n"
        "    from ..runtime import state\n"
        "    from . import audit\n"
        "    from .gate import FlowGate\n"
    )
    assert _imports(probe, "corral.net.probe") == {
        "corral.sdk.sandbox", "corral.cli.main", "corral.runtime.state", "corral.net.audit",
        "corral.net.gate",
    }


def _design_section(title: str) -> str:
    text = DESIGN.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_design_md_layer_table_is_the_rule_tested_here() -> None:
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", _design_section("Layers"), re.MULTILINE)
    table = {
        layer: frozenset(re.findall(r"`(\w+)`", allowed)) for layer, allowed in rows
    }
    assert table == MAY_IMPORT


def test_design_md_names_only_modules_that_exist() -> None:
    """The "where things are" map (and the rest of design.md) is kept current."""
    named = set(re.findall(r"`((?:[a-z_0-9]+/)*[a-z_0-9]+\.py)`", DESIGN.read_text()))
    root = SRC.parent.parent
    missing = sorted(
        p for p in named if not any((base / p).is_file() for base in (SRC, SRC.parent, root))
    )
    assert named and not missing, missing


def test_every_corral_error_is_defined_in_errors_py() -> None:
    """docs/design.md: errors.py holds every exception a user can meet (CorralError and its
    subclasses; the re-exports elsewhere are the same classes). A module-private subclass
    (``_Missing``) is a signal its module catches and turns into one of these."""
    for info in pkgutil.walk_packages(corral.__path__, "corral."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
    pending: list[type[BaseException]] = [CorralError]
    seen = []
    while pending:
        cls = pending.pop()
        seen.append(cls)
        pending.extend(cls.__subclasses__())
    elsewhere = [
        f"{c.__module__}.{c.__qualname__}"
        for c in seen
        if c.__module__ != "corral.errors" and not c.__name__.startswith("_")
    ]
    assert not elsewhere, elsewhere
