"""The package layout: the method (``pilora``) does not depend on the runner, and a job folder
stores no module path, so moving a module never breaks loading an old run."""

import ast
import os
import re
import zipfile

from helpers import FAST, compose_cfg, glue_overrides
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "pilora")


def _from_module(node, package):
    """The absolute module a ``from ... import`` in a module of ``package`` (its parts) reads."""
    if not node.level:
        return node.module or ""
    return ".".join(package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else []))


def _imports(path):
    """The ``pilora`` submodules one file imports (absolute names), relative imports resolved."""
    package = os.path.relpath(path, ROOT)[:-3].split(os.sep)[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            mod = _from_module(node, package)
            if mod.split(".")[0] == "pilora":
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pilora"))
    return found


def test_the_method_never_imports_the_runner():
    """``pilora/`` outside ``pilora/runner`` (the method, its tasks and methods) imports neither the
    runner nor Hydra/OmegaConf: a user applies PiLoRA to a model without the job machinery."""
    offenders = []
    for dirpath, _, files in os.walk(PKG):
        if os.path.relpath(dirpath, PKG).split(os.sep)[0] == "runner":
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                text = open(path).read()
                bad = sorted(m for m in _imports(path) if m.startswith("pilora.runner"))
                if bad or re.search(r"^\s*(import|from) (hydra|omegaconf)\b", text, re.M):
                    offenders.append((os.path.relpath(path, ROOT), bad))
    assert not offenders, offenders


def _module_level_imports():
    """``{module: pilora modules it imports when it is imported}``: top-level statements only (a
    function's own imports and ``if TYPE_CHECKING:`` blocks run later or never); ``from . import x``
    of a submodule counts the submodule, not the package that is already being initialised."""
    mods = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(dirpath, f)
    graph = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        found = set()
        for stmt in ast.parse(open(path).read()).body:
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
                continue
            for node in ast.walk(stmt) if isinstance(stmt, (ast.If, ast.Try)) else [stmt]:
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                    target = _from_module(node, package.split("."))
                    subs = {f"{target}.{a.name}" for a in node.names} & set(mods)
                    found |= subs | ({target} if len(subs) < len(node.names) else set())
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def test_no_module_imports_itself_back_when_loaded():
    """The import graph of ``pilora`` at import time has no cycle (a cycle would make a module's
    names depend on which module a user imports first)."""
    graph, state, cycles = _module_level_imports(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) > 40 and graph["pilora.runner.train"] >= {"pilora.methods", "pilora.tasks"}
    assert not cycles, cycles


def _strings_in(path):
    """The text of a job file: JSON/YAML/log as is, a torch zip (``.pt``/``.bin``) by its pickles."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return "".join(z.read(n).decode("latin-1") for n in z.namelist() if n.endswith(".pkl"))
    with open(path, "rb") as f:
        head = f.read()
    if path.endswith(".safetensors"):  # only its JSON header is text
        n = int.from_bytes(head[:8], "little")
        return head[8 : 8 + n].decode()
    return head.decode("latin-1")


def test_a_job_folder_stores_no_module_path_and_reloads(tmp_path):
    """A PiLoRA job's files (record, manifest, statistics, checkpoints, adapters, Hydra-free
    configs) name no ``pilora.<module>``: loading an old run never depends on where a module
    lives. The statistics and the adapter then load through the public API."""
    from pilora import ImportanceStats, count_parameters, load_adapter
    from pilora.runner.train import train
    from pilora.tasks import make_task

    out = tmp_path / "run"
    cfg = compose_cfg(
        glue_overrides(tmp_path / "d", n_train=32, n_val=16)
        + FAST
        + ["method=pilora", "method.stage1.max_steps=2", "method.importance_interval=1", "trainer.max_steps=2"],
        out,
    )
    rec = train(cfg)
    assert rec["status"] == "complete"
    pattern = re.compile(r"pilora\.(?!json\b)[a-z_]+")
    seen = 0
    for dirpath, _, files in os.walk(out):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith((".log",)) or "wandb" in path.split(os.sep):
                continue
            seen += 1
            hits = set(pattern.findall(_strings_in(path)))
            assert not hits, (os.path.relpath(path, out), hits)
    assert seen > 10  # record, job.json, importance.pt, checkpoints, both adapters
    stats = ImportanceStats.load(str(out / "importance.pt"))
    assert stats.modules and all(m.checks == 2 for m in stats.modules.values())
    plain = OmegaConf.to_container(cfg, resolve=True)
    model = load_adapter(make_task(plain["task"], plain["model"]).build_model(), str(out / "adapter_pilora"))
    assert count_parameters(model).adapter == rec["params"]["adapter"] > 0  # the trained partition, rebuilt


def test_only_the_library_installs_no_generic_top_level_names(tmp_path):
    """``pip install -e .`` puts ``pilora`` on the path and nothing else: ``analysis`` and
    ``benchmarks`` are the repository's tools, importable from its root only, so they never shadow
    (or are shadowed by) another distribution's module of that name."""
    import subprocess
    import sys

    code = "import importlib.util as u, pilora; print([n for n in ('analysis', 'benchmarks') if u.find_spec(n)])"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
