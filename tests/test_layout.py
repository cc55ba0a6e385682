"""The house's shape, read from the source: imports point down, and the registries hold no cycle.

`pipeline/` is grouped by concept into packages, each a layer of the house: a module imports its own
package and the layers below it, never one above. The CLI is the top: it alone runs the stages, and
nothing imports it.

The graph has an edge for every import of a `pipeline` or `stages` module, at any depth in a file
(an import inside a function is still a dependency, and must not hide a cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
TOP = {"pipeline.cli"}  # the only module that may run the stages
# Bottom to top. The baseline's vocabulary counts syllables as the scoring protocol does, so `models` stands
# on `evaluation`'s text; chunked extraction runs an encoder, so `data` stands on `encoders`.
LAYERS = ("core", "encoders", "data", "evaluation", "models", "decoding", "training", "workflow", "serve", "demo",
          "stages", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules that `path` imports: `from a.b import c` is a.b.c where that is a module, else a.b."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = modules()
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source(graph):
    # Guards the reader itself: a graph with no edges would pass every test below.
    assert {"pipeline.models.base", "pipeline.models.viclipcap.lm"} <= graph["pipeline.models.viclipcap.captioner"]
    assert "pipeline.encoders.clip" in graph["pipeline.encoders"]
    assert "stages.score" in graph["pipeline.cli"]
    assert "pipeline.evaluation.results" in graph["pipeline.demo"]


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_top_of_the_house_runs_stages(graph):
    importers = {name for name, targets in graph.items() if any(t.startswith("stages") for t in targets)}
    assert importers <= TOP, importers - TOP


def package(module: str) -> str:
    """The layer a module belongs to: its package under `pipeline`, or the stages."""
    top, _, rest = module.partition(".")
    return "stages" if top == "stages" else rest.split(".")[0]


def layer(module: str) -> int:
    return LAYERS.index(package(module))


def test_every_module_stands_in_a_layer():
    unplaced = [name for name in modules() if name != "pipeline" and package(name) not in LAYERS]
    assert not unplaced, f"put their package in LAYERS: {unplaced}"


def test_imports_point_down_the_layers(graph):
    upward = [(name, target) for name, targets in graph.items() for target in targets
              if name != "pipeline" and target != "pipeline" and layer(target) > layer(name)]
    assert not upward, upward


def test_the_layer_check_sees_an_upward_import():
    assert layer("pipeline.core.config") < layer("pipeline.models.base") < layer("stages.train") < layer("pipeline.cli")


def test_nothing_imports_the_cli(graph):
    assert not [name for name, targets in graph.items() if "pipeline.cli" in targets]


def test_no_module_imports_a_package_above_it(graph):
    """A leaf of encoders/ or models/ imports `base` and its siblings, never its package's __init__:
    the package imports its leaves to register them (models/ on first use), and an edge back up would close a
    cycle."""
    upward = [
        (name, target) for name, targets in graph.items() for target in targets
        if target != "pipeline" and name.startswith(target + ".")
    ]
    assert not upward, upward


def test_registries_find_every_leaf():
    from pipeline.core.registry import MODELS, STORES
    from pipeline.encoders.base import REGISTRY as encoders
    from pipeline.models import REGISTRY as architectures
    from pipeline.models import architecture

    assert {s.encoder for s in STORES.values()} == set(encoders)
    assert all(architecture(name) is architectures[m.architecture] for name, m in MODELS.items())
    assert {m.architecture for m in MODELS.values()} == set(architectures)


def test_the_baseline_and_the_comparison_never_load_the_lm_stack():
    """Each model's architecture is imported when a model of it is first built or loaded: transformers and peft
    cost a process seconds, and the baseline's stages and `viclip compare` need neither."""
    probe = ("import sys; import pipeline.cli, stages.train, stages.score, stages.compare; "
             "from pipeline.models import architecture; architecture('cnn_lstm'); "
             "print(sorted(m for m in ('transformers', 'peft', 'pipeline.models.viclipcap') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert loaded.stdout.split() == ["[]"], loaded.stdout + loaded.stderr
