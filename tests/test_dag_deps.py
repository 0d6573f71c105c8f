"""dvc.yaml's code deps cannot drift: every `pipeline` module a stage runs lies in a folder its deps name.

A module a stage loads but its deps omit would not rerun the stage when it changes: a stale result that DVC reports
as up to date. Two views of "loads": what importing the stage's module puts in `sys.modules` (in a fresh process),
and every module reachable through `import` statements from it, those inside functions too (an engine or a decoder
imported only when a param asks for it).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _body(stage: dict) -> dict:
    return stage.get("do", stage)  # foreach stages keep cmd and deps under `do`


def _module(stage: dict) -> str:
    cmd = _body(stage)["cmd"]
    found = re.search(r"python -m (stages\.\w+)", cmd)
    assert found, f"no `python -m stages.<name>` in {cmd!r}"
    return found.group(1)


def _file(module: str) -> Path | None:
    """The source file of a module of this repository (a package's __init__.py), or None for another's."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def loaded(module: str) -> set[str]:
    """The `pipeline` modules in sys.modules once `module` is imported in a fresh interpreter."""
    code = f"import json, sys, {module}; print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'pipeline']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def imported(module: str) -> set[str]:
    """Every `pipeline` module reachable from `module` through import statements, wherever they stand."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                todo.append(base)
                todo += [f"{base}.{alias.name}" for alias in node.names]  # `from pipeline.x import module`
    return {m for m in seen if m.split(".")[0] == "pipeline"}


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == dep or rel.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_runs_is_covered_by_its_deps(name):
    stage = STAGES[name]
    module = _module(stage)
    deps = [str(d) if not isinstance(d, dict) else next(iter(d)) for d in _body(stage)["deps"]]
    assert covered(_file(module), deps), f"{name}: its own file {module} is not among its deps"
    modules = (loaded(module) | imported(module)) - {"pipeline"}  # the top package: empty (test below)
    missing = sorted(
        str(_file(m).relative_to(REPO)) for m in modules if _file(m) is not None and not covered(_file(m), deps)
    )
    assert not missing, f"dvc.yaml stage {name} runs code its deps do not name: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_package_folders(name):
    """A handful of folders, not a list of files to keep in step by hand."""
    deps = [d for d in _body(STAGES[name])["deps"] if isinstance(d, str) and d.startswith("pipeline")]
    files = [d for d in deps if not (REPO / d).is_dir()]
    assert not files, f"{name}: name the package folders, not files: {files}"
    assert deps, f"{name}: names no pipeline package"


def test_package_init_files_are_empty():
    """Importing a package runs nothing and loads nothing: a head stage imports no torch, the ONNX predictor runs
    without it, and no stage depends on code it does not run."""
    inits = sorted((REPO / "pipeline").rglob("__init__.py"))
    assert len(inits) >= 8
    assert [p for p in inits if p.read_text().strip()] == []


def test_the_import_walk_finds_lazy_imports():
    """The static view sees an import inside a function: the Ray engine, imported only when extract.engine is ray."""
    assert "pipeline.features.engines.ray_data" in imported("stages.extract")
    assert "pipeline.features.engines.ray_data" not in loaded("stages.extract")
