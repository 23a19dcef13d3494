"""The shape of the package: imports point one way, no circles, no oversized rooms.

Layers, lowest first (a module may import from its own layer or below, never above):

0. ``_version``, ``errors``, ``progress`` (what a long step is doing, for whoever shows it)
1. pure helpers: ``fields`` (options and block names, no torch), ``validate`` (model files read back, checked), ``limits`` (the pixel budget of input files), ``fileio``, ``outputs`` (which --out may be replaced), ``decision``, ``ops``, ``coreset``, ``images``, ``metrics``, ``neurons``, ``data``, ``viz``, ``testing``
2. ``api``: the Detector protocol, Prediction, Runtime, the model directory; ``runtime``: exported models run without torch
3. ``backbones``: one adapter per family, the registry, the feature cache
4. ``base``: what every detector shares (BaseDetector); ``state``: learned state declared once (LearnedState, the shared parts); ``methods/``: one wing per method: ``lake`` (LAKE),
   ``winclip`` (WinCLIP, WinCLIP+, WinCLIP+LAKE), ``bank`` (what the memory-bank methods share), ``patchcore``, ``anomalydino``
   (``methods.bank_options``, their options without torch, sits in layer 1)
5. ``methods`` (its ``__init__``): the registry of methods
6. users of detectors: ``batch`` (and its output directory, ``rundir``), ``distributed``, ``evaluate``, ``explain``, ``serve``, ``export``, ``line`` (update, versions); ``options``
   (a config's fields as command-line options and form fields, for ``cli`` and ``serve``); ``configfile`` (--config, --print-config)
7. the command line: ``cli_common`` (the app, messages, shared options), ``cli``, ``cli_eval``
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lakead"

LAYERS = {
    "_version": 0, "_lazy": 0, "errors": 0, "progress": 0,
    "fields": 1, "support": 1, "validate": 1, "limits": 1, "methods.bank_options": 1, "fileio": 1, "outputs": 1, "medical": 1, "decision": 1, "ops": 1, "index": 1, "coreset": 1, "images": 1, "metrics": 1, "neurons": 1, "data": 1, "layouts": 1, "spro": 1, "viz": 1, "testing": 1,
    "patchops": 1, "pca": 1,
    "synthetic": 1,  # lakead tune's defects
    "api": 2, "runtime": 2,
    "backbones": 3,
    "base": 4, "state": 4, "methods.lake": 4, "methods.bank": 4, "methods.patchcore": 4, "methods.anomalydino": 4, "methods.subspace": 4, "methods.winclip": 4,
    "methods": 5,
    "batch": 6, "rundir": 6, "distributed": 6, "evaluate": 6, "explain": 6, "serve": 6,
    "options": 6, "export": 6, "line": 6, "helpstyle": 6, "configfile": 6, "cli": 7, "cli_common": 7, "cli_eval": 7, "cli_demo": 7, "cli_layers": 7, "cli_line": 7, "runtime_cli": 7, "__init__": 8, "__main__": 8,
    "selection": 6, "cli_tune": 7,  # lakead tune
}
#: Most lines one module may have (a room doing one job).
MAX_LINES = 560


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC).with_suffix("").parts): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Modules of lakead that ``name`` imports (relative imports resolved; function-level ones too)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if path.name == "__init__.py":
        package = name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("lakead"):
                target = node.module.removeprefix("lakead").lstrip(".")
            else:
                continue
            for alias in node.names:
                out.add(f"{target}.{alias.name}" if target else alias.name)
                out.add(target)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("lakead.") for a in node.names if a.name.startswith("lakead.")}
    return {t for t in out if t}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import target names (a name inside a module counts as the module)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
        if f"{cand}.__init__" in modules:
            return f"{cand}.__init__"
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = {_resolve(t, modules) for t in _imports(name, path)}
        graph[name] = {d for d in deps if d and d != name}
    return graph


def _room(module: str) -> str:
    """The key of LAYERS a module belongs to: its longest dotted prefix there (``methods.lake.fit``
    -> ``methods.lake``; ``methods.__init__``, the registry -> ``methods``)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return ".".join(parts[:i])
    raise KeyError(module)


def _layer(module: str) -> int:
    return LAYERS[_room(module)]


def test_every_module_has_a_layer():
    missing = []
    for m in _modules():
        try:
            _room(m)
        except KeyError:
            missing.append(m)
    assert missing == []


def test_no_import_points_upward():
    upward = [(m, d) for m, deps in _graph().items() for d in deps
              if _layer(d) > _layer(m) and _room(m) != _room(d)]
    assert upward == []


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exports its modules: an edge into an __init__ from inside its package is not a dependency
    def deps(m):
        return {d for d in graph[m] if not (d.endswith("__init__") and m.startswith(d.removesuffix("__init__")))}

    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in deps(m):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_room_is_oversized(module):
    lines = len(_modules()[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines"
