"""The import graph of the library, read from the source with ``ast``: the packages form layers,
each importing only from the layers below it (or its own), so there is no cycle between them.

The order (docs/architecture.md, "Layers"): config, cli < models < augment < data < formats <
evaluation, convert < inference < engine < visualize, demo, ablation, benchmark < tools. Imports inside functions
count as much as top-level ones; no two modules import each other, none imports another's private
name, and no library file is over 600 lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    {"avmae.config", "avmae.cli"},
    {"avmae.models"},
    {"avmae.augment"},
    {"avmae.data"},
    {"avmae.formats"},
    {"avmae.evaluation", "avmae.convert"},
    {"avmae.inference"},
    {"avmae.engine"},
    {"avmae.visualize", "avmae.demo", "avmae.ablation", "avmae.benchmark"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "models":  # installed as avmae.models
        parts = ["avmae", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*(REPO / "avmae").rglob("*.py"), *(REPO / "models").rglob("*.py")]
    return {_module_name(p): p for p in files}


def _unit(module: str) -> str:
    """The layer unit of a module: ``avmae.<package or module>``."""
    return ".".join(module.split(".")[:2])


def _imports(module: str, path: Path, sources: dict[str, Path]):
    """``(target module, imported name or None)`` for every import of an avmae module in ``path``,
    those inside functions included; ``from pkg import sub`` resolves to ``pkg.sub``."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names if a.name.startswith("avmae"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("avmae"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, None) if sub in sources else (target, alias.name)


def module_imports() -> dict[str, set[str]]:
    """Module -> the avmae modules it imports."""
    sources = _sources()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in sources.items():
        graph[module].update(target for target, _ in _imports(module, path, sources))
    return graph


def unit_graph() -> dict[str, set[tuple[str, str]]]:
    """Layer unit -> {(imported unit, importing module)}, the package facade ``avmae`` left out
    (it only re-exports ``from_pretrained`` and ``load``, lazily)."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for module, targets in module_imports().items():
        if module == "avmae":
            continue
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b:
                edges[a].add((b, module))
    return edges


def test_every_package_has_a_layer_and_imports_only_downwards():
    units = {_unit(m) for m in _sources() if m != "avmae"}
    assert units <= set(LAYER_OF), f"place {sorted(units - set(LAYER_OF))} in LAYERS and docs/architecture.md"
    upward = [
        f"{module} imports {target} (layer {LAYER_OF[target]} > {LAYER_OF[unit]})"
        for unit, edges in unit_graph().items()
        for target, module in sorted(edges)
        if target != "avmae" and LAYER_OF[target] > LAYER_OF[unit]
    ]
    assert not upward, "\n".join(upward)
    bare = [m for m, targets in module_imports().items() if "avmae" in targets and m != "avmae"]
    assert not bare, f"{bare} import the package facade `avmae`; import the module they need"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages():
    graph = {unit: {target for target, _ in edges} - {"avmae"} for unit, edges in unit_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_modules():
    # within a package as well: two modules that import each other (one inside a function) are one
    # module in two files
    cycle = find_cycle({m: targets - {m} for m, targets in module_imports().items()})
    assert cycle is None, " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_module():
    sources = _sources()
    private = [
        f"{module} imports {name} from {target}"
        for module, path in sorted(sources.items())
        for target, name in _imports(module, path, sources)
        if name and name.startswith("_") and target != module
    ]
    assert not private, "make these public or move them:\n" + "\n".join(private)


MAX_LINES = 600


def test_no_library_file_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _sources().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these files (over {MAX_LINES} lines): {long}"


def test_the_cycle_finder_finds_a_cycle():
    # the check above would pass vacuously with a finder that never finds anything
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_third_party_import_of_the_library_is_declared():
    import importlib.metadata
    import re
    import sys

    declared = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in _pyproject()["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = set()
    for path in _sources().values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in ("avmae", "models", "__future__") or top in sys.stdlib_module_names:
                    continue
                if top in ("deepspeed", "transformers", "psutil"):  # optional, imported where used
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not dists & declared:
                    undeclared.add(f"{top} ({path.relative_to(REPO)})")
    assert not undeclared, f"imported but not in pyproject's dependencies: {sorted(undeclared)}"


def test_package_data_files_exist():
    setuptools = _pyproject()["tool"]["setuptools"]
    dirs = {pkg: REPO / Path(*pkg.split(".")) for pkg in setuptools["packages"]}
    dirs.update({pkg: REPO / folder for pkg, folder in setuptools.get("package-dir", {}).items()})
    missing = [str(dirs[pkg] / name) for pkg, names in setuptools["package-data"].items() for name in names
               if not (dirs[pkg] / name).is_file()]  # fmt: skip
    assert not missing, f"listed in package-data but absent: {missing}"


def test_every_library_package_is_installed():
    # a package folder missing from pyproject's list imports in a checkout but not once installed
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    packages = {m for m, p in _sources().items() if p.name == "__init__.py"}
    assert packages <= listed, f"add to [tool.setuptools] packages: {sorted(packages - listed)}"



def test_the_public_api_is_what_type_checkers_see():
    # avmae.__all__ resolves lazily at run time; the `if TYPE_CHECKING:` imports must name the same
    # objects, or editors offer something else than what runs
    import importlib

    import avmae

    tree = ast.parse((REPO / "avmae" / "__init__.py").read_text())
    seen = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for imp in node.body:
                seen.update({alias.asname or alias.name: imp.module for alias in imp.names})
    assert sorted(seen) == sorted(avmae.__all__)
    for name, module in seen.items():
        assert getattr(avmae, name) is getattr(importlib.import_module(module), name), name


def test_the_build_backend_reads_the_license_field():
    """`license = "Apache-2.0"` (an SPDX string, PEP 639) needs setuptools >= 77 to build."""
    import re

    project = _pyproject()
    assert isinstance(project["project"]["license"], str)
    (requirement,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    bound = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement.replace(" ", ""))
    assert bound and int(bound.group(1)) >= 77, requirement


def test_every_tool_ends_through_run_tool():
    # avmae.cli.run_tool gives every tool the same exit statuses and one-line errors (docs/architecture.md)
    tools = sorted((REPO / "tools").glob("*.py"))
    assert tools
    missing = [p.name for p in tools if "sys.exit(run_tool(main))" not in p.read_text()]
    assert not missing, f"these tools do not end through avmae.cli.run_tool: {missing}"


def test_the_readme_states_these_layers():
    # README, "Layout": "Packages import only from the layers below them (config, cli < models < ...)"
    import re

    text = " ".join((REPO / "README.md").read_text().split())
    order = re.search(r"Packages import only from the layers below them \(([^;)]*)", text).group(1)
    stated = [{f"avmae.{name.strip()}" for name in layer.split(",")} for layer in order.split("<")]
    assert stated[-1] == {"avmae.tools"} and stated[:-1] == LAYERS, order
