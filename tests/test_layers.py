"""The package's import graph: stages import only from stages before them, with no cycle, and the training path
imports without the media stack (a GPU training box may have no PyAV, ffmpeg, mediapipe, piper or pocketsphinx).

Every import counts, also those inside functions (a lazy import is still a dependency); only `if TYPE_CHECKING:`
blocks are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lipsync_cli"

# The stages in the order the data travels: a module may import its own stage and any stage before it, never one
# after it. A stage is the first name under lipsync_cli (a module or a subpackage).
LAYERS = (
    "errors",  # the one exception type
    "files",  # file kinds, atomic writes
    "progress",  # logging and progress bars
    "background",  # a decoder ahead in a thread, a job in its own process
    "settings",  # the settings object (read by the CLI only; everything else receives it or its values)
    "audio",  # signal processing on speech
    "media",  # decode / encode (PyAV, ffmpeg)
    "face",  # detection, mesh, tracking, alignment, mouth geometry
    "phones",  # forced alignment / phone recognition (pocketsphinx)
    "visemes",  # phones -> what the mouth must show per frame
    "voice",  # TTS, speaker embeddings, voice conversion and cloning
    "compositing",  # timing plan and compositing
    "data",  # corpora, import, prep, shards, datasets
    "models",  # the learned models (and the self-fitted map) with their training tasks
    "training",  # the training loop: options, schedule, processes, checkpoint state, result
    "engine",  # mouth engines: models driven per video
    "dubbing",  # the dubbing pipeline
    "eval",  # metrics and protocols over the pipeline
    "api",  # the Python API: Dubber, dub, speak
    "batch",  # dub --batch: many jobs through one Dubber
    "app",  # the web app over one Dubber
    "cli",  # the command line
)
BLOCKED = ("av", "ffmpeg", "mediapipe", "piper", "pocketsphinx")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """lipsync_cli modules `tree` imports (resolving `from pkg import submodule` to the submodule)."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in out if m == "lipsync_cli" or m.startswith("lipsync_cli.")}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        deps = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        # importing a submodule runs its parent packages first: that is not a dependency on them
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_stage_is_named() -> None:
    stages = {_stage(m) for m in import_graph()} - {""}
    assert stages <= set(LAYERS), f"modules outside the layer order: {sorted(stages - set(LAYERS))}"


def test_no_upward_import() -> None:
    rank = {s: i for i, s in enumerate(LAYERS)}
    upward = [
        f"{m} -> {d}"
        for m, deps in sorted(import_graph().items())
        for d in sorted(deps)
        if _stage(m) and _stage(d) and rank[_stage(d)] > rank[_stage(m)]
    ]
    assert not upward, "imports of later stages:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a closed path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def training_path() -> list[str]:
    """Every lipsync_cli module the training loop and the models' task factories can reach, lazily or not."""
    graph = import_graph()
    todo = ["lipsync_cli.training", "lipsync_cli.models", *[f"lipsync_cli.models.{n}" for n in _model_names()]]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return sorted(seen)


def _model_names() -> tuple[str, ...]:
    tree = ast.parse((PKG / "models" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODELS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("models/__init__.py has no MODELS")


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on a training box)", name=name)
        return None
sys.meta_path.insert(0, Block())
import importlib
for m in {modules!r}:
    importlib.import_module(m)
from lipsync_cli import models
for name in models.MODELS:
    assert callable(models.module(name).make_task), name
bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("loaded:", bad)
raise SystemExit(1 if bad else 0)
"""


def test_training_imports_without_the_media_stack() -> None:
    path = training_path()
    for stage in ("media", "phones", "voice", "engine", "dubbing", "eval", "cli"):
        assert not [m for m in path if _stage(m) == stage], f"training reaches {stage}: {path}"
    code = BLOCKER.format(blocked=BLOCKED, modules=path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_blocker_blocks() -> None:
    """The same subprocess fails when the path does need a blocked package (the test above can fail)."""
    code = BLOCKER.format(blocked=BLOCKED, modules=["lipsync_cli.media"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "blocked: not on a training box" in r.stderr
