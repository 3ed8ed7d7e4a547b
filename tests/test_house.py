"""The rules the package's layout keeps: light command-line face, Ray in one module, no import
cycles, the reading side independent of the run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vqpipe"
# The run's one Ray module, and the Ray Data integration (Ray by definition; nothing else imports it).
RAY_MODULES = {"vqpipe.run.driver", "vqpipe.ray_data"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported when the module is imported (not inside functions or TYPE_CHECKING)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                names.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.add(sub.module)
                names.update(f"{sub.module}.{a.name}" for a in sub.names)
    return names


def _loaded_modules(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('LOADED:', *(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.strip().splitlines()[-1].split()[1:])


@pytest.mark.parametrize("code", [
    "import vqpipe, vqpipe.config",
    "from vqpipe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from vqpipe.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass",
    "from vqpipe.cli import main\nmain(['run', '--help-config'])",
])
def test_command_line_face_imports_neither_torch_nor_ray(code):
    assert _loaded_modules(code) == set()


def test_inspect_imports_neither_torch_nor_ray(tmp_path):
    from vqpipe.output.sink import ShardWriter, TokenLayout

    layout = TokenLayout((2, 2), (4, 2, 2), 16, write_latents=True, latent_dtype="float32")
    meta = {"num_vq_embeddings": 16, "latent_shape": [4, 2, 2], "latent_dtype": "float32", "scaling_factor": 0.5}
    writer = ShardWriter(str(tmp_path), "s0", layout, meta, {})
    rng = np.random.default_rng(0)
    writer.write(["a", "b"], ["s0.tar"] * 2, rng.integers(0, 16, (2, 2, 2)), rng.normal(size=(2, 4, 2, 2)),
                 [None, None], [None, None], [8, 8], [8, 8])
    assert writer.commit({"source": "s0.tar"}).committed
    code = f"from vqpipe.cli import main\nassert main(['inspect', {str(tmp_path)!r}]) == 0"
    assert _loaded_modules(code) == set()


def test_ray_is_imported_only_by_the_driver():
    users = {name for name, tree in _modules().items()
             if any(n == "ray" or n.startswith("ray.") for n in _all_imports(tree))}
    assert users <= RAY_MODULES, f"modules importing Ray besides the driver: {sorted(users - RAY_MODULES)}"


def _all_imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _top_level_imports(tree) if m in modules and m != name}
             for name, tree in modules.items()}
    # A package's __init__ is imported with any of its modules: an edge to it is no cycle of ours.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_reading_side_does_not_depend_on_the_run():
    for name, tree in _modules().items():
        if name.startswith("vqpipe.read"):
            run_deps = sorted(m for m in _all_imports(tree) if m.startswith("vqpipe.run"))
            assert not run_deps, f"{name} imports {run_deps}"


def test_every_output_folder_name_lives_in_the_layout():
    offenders = [name for name, tree in _modules().items() if name != "vqpipe.output.layout"
                 and any(isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("_vqpipe/")
                         for n in ast.walk(tree))]
    assert offenders == []
