"""The house rules the code review would otherwise have to remember, checked on every run of the suite:
short functions, no method-name comparisons outside ``methods/``, no test-time method names compared outside
``tta/``, no references to documents the repository does not hold, and test-only helpers kept out of the library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prolip"
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, length) of every function or method longer than ``limit`` lines: the ``def`` line and the body, so a
    signature the formatter lays out one parameter per line (a click command's options) does not count as logic."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.body[0].lineno + 2
            if length > limit:
                out.append((node.name, length))
    return out


def _names_a_method(node: ast.AST) -> bool:
    """``name``, ``x.name``, ``method``, ``x.method_name``, ``r["method"]`` and the like."""
    keys = {"name", "method", "method_name"}
    if isinstance(node, ast.Name):
        return node.id in keys
    if isinstance(node, ast.Attribute):
        return node.attr in keys
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in keys


def method_name_comparisons(source: str) -> list[str]:
    """Comparisons of something called ``name`` or ``method`` with a string literal naming a registered method."""
    from prolip.methods import available

    names = set(available())
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            literals = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            literals += [
                e.value
                for c in node.comparators
                if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                for e in c.elts
                if isinstance(e, ast.Constant)
            ]
            if any(isinstance(v, str) and v in names for v in literals) and any(
                map(_names_a_method, [node.left, *node.comparators])
            ):
                found.append(ast.unparse(node))
    return found


def _names_a_family(node: ast.AST) -> bool:
    """``family``, ``x.family``, ``info.family``, ``b["family"]``."""
    if isinstance(node, ast.Name):
        return node.id == "family"
    if isinstance(node, ast.Attribute):
        return node.attr == "family"
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "family"


def family_name_comparisons(source: str) -> list[str]:
    """Comparisons of a backbone's family with a string literal: what a family can do is declared by the family
    (``backbone.family``'s fields), never decided by its name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(map(_names_a_family, sides)) and any(
                isinstance(c, ast.Constant) and isinstance(c.value, str)
                for side in sides
                for c in ([side] if not isinstance(side, (ast.Tuple, ast.List, ast.Set)) else side.elts)
            ):
                found.append(ast.unparse(node))
    return found


def _names_a_test_time_method(node: ast.AST) -> bool:
    """``name``, ``kind``, ``label``, ``method``, ``x.test_time``, ``cell.extra["kind"]`` and the like."""
    keys = {"name", "kind", "label", "method", "method_name", "test_time"}
    if isinstance(node, ast.Name):
        return node.id in keys
    if isinstance(node, ast.Attribute):
        return node.attr in keys
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in keys


def tta_method_comparisons(source: str) -> list[str]:
    """Comparisons of a name, kind or label with a string literal naming a registered test-time method, or a row
    label made of one ("tta+prolip"): what a test-time method does is declared by its class (``prolip.tta``), never
    decided by its name."""
    from prolip.tta import available

    names = set(available())
    is_named = lambda v: isinstance(v, str) and (v in names or v.split("+", 1)[0] in names)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literals = [
                c.value
                for side in sides
                for c in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side])
                if isinstance(c, ast.Constant)
            ]
            if any(map(is_named, literals)) and any(map(_names_a_test_time_method, sides)):
                found.append(ast.unparse(node))
    return found


def test_the_checkers_can_fail():
    long = "def f():\n" + "    x = 1\n" * 70
    assert long_functions(long) == [("f", 71)]
    assert long_functions("def g(\n" + "    a%d,\n" * 70 % tuple(range(70)) + "):\n    return 1\n") == []
    assert method_name_comparisons("if m.name == 'prolip-text': pass") == ["m.name == 'prolip-text'"]
    assert method_name_comparisons("ok = m.name not in ('zeroshot', 'prolip')")
    assert method_name_comparisons("if rec['method'] == 'prolip': pass")
    assert not method_name_comparisons("if kind == 'tta': pass")
    assert not method_name_comparisons("if meta.get('format') == 'prolip': pass")
    assert family_name_comparisons("if backbone.info.family != 'open_clip': pass")
    assert family_name_comparisons("x = 1 if b['family'] in ('hf', 'x') else 2")
    assert not family_name_comparisons("if backbone.family.export_format == 'hf': pass")
    assert tta_method_comparisons("if kind == 'tda': pass") == ["kind == 'tda'"]
    assert tta_method_comparisons("x = cell.extra['kind'] in ('tpt', 'zero')")
    assert tta_method_comparisons("if spec.name != 'tta': pass")
    assert tta_method_comparisons("if r['label'] == 'tta+zeroshot': pass")
    assert not tta_method_comparisons("if exp.protocol == 'tta': pass")
    assert not tta_method_comparisons("if r['kind'] in ('dataset', 'group'): pass")


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_over_60_lines(path):
    assert long_functions(path.read_text()) == []


@pytest.mark.parametrize(
    "path", [p for p in _sources() if "methods" not in p.parts], ids=lambda p: str(p.relative_to(SRC))
)
def test_no_method_name_comparisons_outside_methods(path):
    assert method_name_comparisons(path.read_text()) == []


@pytest.mark.parametrize(
    "path", [p for p in _sources() if "backbones" not in p.parts], ids=lambda p: str(p.relative_to(SRC))
)
def test_no_family_name_comparisons_outside_backbones(path):
    assert family_name_comparisons(path.read_text()) == []


@pytest.mark.parametrize(
    "path", [p for p in _sources() if p.relative_to(SRC).parts[0] != "tta"], ids=lambda p: str(p.relative_to(SRC))
)
def test_no_test_time_method_name_comparisons_outside_tta(path):
    assert tta_method_comparisons(path.read_text()) == []


def test_docstrings_cite_the_paper_or_the_readme_not_a_missing_spec():
    offenders = [str(p.relative_to(SRC)) for p in _sources() if re.search(r"SPEC\s*§", p.read_text())]
    assert offenders == []


def test_test_only_helpers_are_not_shipped():
    shipped = "\n".join(p.read_text() for p in _sources())
    assert "def make_problem" not in shipped and "def write_clip_tokenizer_files" not in shipped


# ---- import cycles ------------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(module: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere: at the top, or inside a function (an import put
    there to dodge a cycle is still the cycle); not those under ``if TYPE_CHECKING:``, which never run."""
    tree = ast.parse(source)
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule, else the module itself
                full = f"{base}.{alias.name}"
                found |= {full} if full in known else ({base} if base in known else set())
    return found - {module}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other, directly or round a loop (Tarjan's strongly connected
    components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_import_cycle_checker_can_fail():
    known = {"p", "p.a", "p.b", "p.c"}
    assert imported_modules("p.a", "def f():\n    from p.b import x\n", known) == {"p.b"}
    assert imported_modules("p.a", "from p import b, y\n", known) == {"p.b", "p"}
    assert imported_modules("p.a", "from . import c\nfrom .b import z\n", known) == {"p.c", "p.b"}
    assert (
        imported_modules("p.a", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.b\n", known) == set()
    )
    assert import_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) == [["p.a", "p.b", "p.c"]]
    assert import_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set()}) == []


def test_no_import_cycles_in_src():
    sources = {_module_name(p): p for p in _sources()}
    known = set(sources)
    graph = {m: imported_modules(m, p.read_text(), known, p.name == "__init__.py") for m, p in sources.items()}
    assert import_cycles(graph) == []


# ---- protocol names -----------------------------------------------------------------------------------------------


def _protocol_name_constants(tree: ast.AST, names: set[str]) -> set[str]:
    """Module names bound to a tuple, list or set of protocol names only (``TRANSFER = ("cross-dataset", ...)``):
    a comparison with one is a comparison with those names."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)):
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.value.elts]
            if values and all(v in names for v in values):
                found |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return found


def protocol_name_comparisons(source: str) -> list[str]:
    """Comparisons with a string literal naming a registered bench protocol, or with a constant made of such names:
    what a protocol does (its checks, requests, metrics, report layout) is declared by its class in
    ``bench/protocols/``, never decided by its name elsewhere."""
    from prolip.bench.protocols import available

    names = set(available())
    tree = ast.parse(source)
    constants = _protocol_name_constants(tree, names)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            parts = [e for s in sides for e in (s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [s])]
            if any(isinstance(p, ast.Constant) and p.value in names for p in parts) or any(
                isinstance(p, ast.Name) and p.id in constants for p in parts
            ):
                found.append(ast.unparse(node))
    return found


def test_the_protocol_name_checker_can_fail():
    # Every kind of protocol-name test the bench had before protocols declared themselves (c404782).
    before = """
TRANSFER = ("cross-dataset", "domain-generalisation")
PROTOCOLS = ("fewshot", "fewshot-val", "sensitivity", "base2new", "cross-dataset", "domain-generalisation", "tta")
def f(self, exp, rec, row, key, protocol, rows):
    a = self.exp.validation or self.exp.protocol == "fewshot-val"
    b = "" if rec["protocol"] != "sensitivity" else "point"
    if exp.protocol not in PROTOCOLS or exp.protocol == "cross-dataset" and not exp.targets:
        pass
    if exp.protocol in ("cross-dataset", "domain-generalisation") and key[0] == "sensitivity":
        pass
    c = row["protocol"] in TRANSFER and row["dataset"] == row.get("source")
    d = protocol in TRANSFER or any(r["protocol"] == "sensitivity" for r in rows)
"""
    assert len(protocol_name_comparisons(before)) == 9
    assert protocol_name_comparisons("if section not in ('sensitivity', 'tta'): pass")
    assert not protocol_name_comparisons("if layout_of(r['protocol']).source_apart: pass")
    assert not protocol_name_comparisons("if r['kind'] in ('dataset', 'group'): pass")
    assert not protocol_name_comparisons("SECTIONS = ('sensitivity', 'tta')\nx = 'a' in ('b',)")


@pytest.mark.parametrize(
    "path",
    [p for p in _sources() if p.relative_to(SRC).parts[:2] != ("bench", "protocols")],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_no_protocol_name_comparisons_outside_the_protocol_modules(path):
    assert protocol_name_comparisons(path.read_text()) == []
