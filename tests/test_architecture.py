"""The layout's rules, checked by reading the imports (module level, function level and under
TYPE_CHECKING alike) with `ast`: no import cycles, and each layer imports only the layers below it.

Layers (docs/architecture.md):
- core (cds_service/core/): decisions on data already in memory (domain, routing, anatomy, input check,
  priority, preprocessing, decoding, inference, explain, triage, models, settings, errors,
  evaluation statistics); it imports only itself;
- fhir_mappings (the FHIR R4B builders) sits on the core and uses only cds_service.core.domain and
  cds_service.core.errors: the dependency goes one way, fhir_mappings -> core, never back;
- adapters (cds_service/adapters/): the PACS, the FHIR server, SMART auth and token checks, metrics,
  audit, and the job store and queue (cds_service/jobs/); they never import the web layer or an entry point;
- web (cds_service/web/): the Flask app, its context and blueprints; above it the orchestration
  (pipeline) and the entry points (cli, worker, local_triage, validate) at the top of cds_service/;
- cds_training (training time) and cds_devtools (development servers, test data, the demo), never
  imported by the core or an adapter; the runtime imports cds_devtools only where `cds-triage demo`
  runs (inside the CLI's command).
Also: the paths in docs/architecture.md's "Where the code is" table exist, and a module over 400
lines says why at its top.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import AbstractSet, Mapping

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cds_service", "fhir_mappings", "cds_training", "cds_devtools")

CORE = "cds_service.core"
# what the core may import of ours: itself (and the package root, cds_service/__init__.py)
CORE_MAY_USE = ("cds_service.core",)
ADAPTERS = ("cds_service.adapters", "cds_service.jobs")  # the job store and queue talk to SQLite, Redis and huey
# the web layer, the entry points and the tools outside the runtime: never imported by an adapter
NOT_FOR_THE_ADAPTERS = ("cds_service.web", "cds_service.cli", "cds_service.worker", "cds_service.pipeline",
                        "cds_training", "cds_devtools")
FHIR_MAPPINGS_MAY_USE = {"cds_service.core.domain", "cds_service.core.errors"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere in its body (each resolved to the deepest known module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    resolved = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


@functools.cache  # the files do not change during a run: parsed once, not once per test
def import_graph() -> dict[str, frozenset[str]]:
    modules = our_modules()
    return {name: frozenset(imports_of(name, path, set(modules))) for name, path in modules.items()}


def cycles(graph: Mapping[str, AbstractSet[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_scan_sees_function_level_and_type_checking_imports():
    graph = import_graph()
    assert "cds_service.jobs.state" in graph["cds_service.drift"]  # under TYPE_CHECKING
    assert "cds_service.web.app" in graph["cds_service.cli"]  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def in_package(module: str, packages: tuple[str, ...] | str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ((packages,) if isinstance(packages, str) else packages))


def test_the_core_imports_no_adapter_web_training_or_dev_tool():
    graph = import_graph()
    core = {module for module in graph if in_package(module, CORE)}
    assert {"cds_service.core.domain", "cds_service.core.settings", "cds_service.core.models"} <= core
    wrong = {module: sorted(t for t in graph[module] if t != "cds_service" and not in_package(t, CORE_MAY_USE))
             for module in core}
    assert {module: targets for module, targets in wrong.items() if targets} == {}


def test_the_adapters_import_no_web_entry_point_training_or_dev_tool():
    graph = import_graph()
    adapters = {module for module in graph if in_package(module, ADAPTERS)}
    assert {"cds_service.adapters.pacs", "cds_service.adapters.fhir_client", "cds_service.jobs.queue"} <= adapters
    wrong = {module: sorted(t for t in graph[module] if in_package(t, NOT_FOR_THE_ADAPTERS)) for module in adapters}
    assert {module: targets for module, targets in wrong.items() if targets} == {}


WEB = "cds_service.web"
NOT_FOR_THE_WEB = ("cds_service.cli", "cds_service.worker", "cds_service.local_triage", "cds_service.validate",
                   "cds_training", "cds_devtools")


def test_the_web_layer_imports_no_entry_point_training_or_dev_tool():
    graph = import_graph()
    web = {module for module in graph if in_package(module, WEB)}
    assert {"cds_service.web.app", "cds_service.web.cds_hooks.routes"} <= web
    wrong = {module: sorted(t for t in graph[module] if in_package(t, NOT_FOR_THE_WEB)) for module in web}
    assert {module: targets for module, targets in wrong.items() if targets} == {}


def test_fhir_mappings_use_only_the_domain_and_the_errors():
    graph = import_graph()
    used = {t for module, targets in graph.items() if module.startswith("fhir_mappings") for t in targets
            if t.startswith("cds_service")}
    assert used <= FHIR_MAPPINGS_MAY_USE, used - FHIR_MAPPINGS_MAY_USE


def test_fhir_mappings_and_the_core_depend_one_way():
    """fhir_mappings -> cds_service.core, never back: no core module imports fhir_mappings (the CDS Hooks
    cards, which read our FHIR resources with it, are in the web layer)."""
    graph = import_graph()
    core = {module for module in graph if in_package(module, CORE)}
    mappings = {module for module in graph if in_package(module, "fhir_mappings")}
    assert mappings and core
    back = {module: sorted(t for t in graph[module] if in_package(t, "fhir_mappings")) for module in core}
    assert {module: targets for module, targets in back.items() if targets} == {}
    assert any(in_package(t, CORE) for module in mappings for t in graph[module]), "the scan should see fhir_mappings use the core"


# where the runtime may reach the development tools: `cds-triage demo`, imported inside its command
MAY_USE_THE_DEVTOOLS = {"cds_service.cli"}


def test_the_runtime_leaves_the_development_tools_alone():
    graph = import_graph()
    users = {module for module, targets in graph.items() if module.startswith("cds_service")
             and any(t.startswith("cds_devtools") for t in targets)}
    assert users <= MAY_USE_THE_DEVTOOLS, users - MAY_USE_THE_DEVTOOLS
    cli = ast.parse((ROOT / "cds_service" / "cli.py").read_text())
    at_module_level = {node.module for node in cli.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not {m for m in at_module_level if m.startswith("cds_devtools")}, "the CLI imports the demo inside its command"


LONG = 400  # lines; a longer module says why at its top ("# Over 400 lines on purpose: …" or "…, to split next …")


def test_a_long_module_says_why_at_its_top():
    unexplained = sorted(str(path.relative_to(ROOT)) for path in our_modules().values()
                         if len(path.read_text().splitlines()) > LONG
                         and not path.read_text().startswith("# Over 400 lines"))
    assert unexplained == []


def test_the_where_the_code_is_table_names_paths_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Where the code is", 1)[1]
    missing = []
    for row in (line for line in table.splitlines() if line.startswith("| `")):
        folder = ROOT  # a bare name is in the folder of the last full path, or beside it
        for name in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if "/" in name.rstrip("/") or (name.endswith("/") and (ROOT / name).is_dir()):
                path = ROOT / name
                folder = path if name.endswith("/") else path.parent
                found = path.exists()
            else:
                found = (folder / name).exists() or (folder.parent / name).exists()
            if not found:
                missing.append(name)
    assert missing == []
