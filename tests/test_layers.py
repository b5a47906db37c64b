"""The house's floors: every import inside hetcomp runs down a floor, never up.

A room is a top-level module or subpackage of ``hetcomp``; imports inside one room are free.
An import from room A to room B needs ``FLOORS[B] < FLOORS[A]``, whether it sits at the top of
the module or inside a function.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

import hetcomp

ROOT = pathlib.Path(hetcomp.__file__).parent

FLOORS = {
    # Ground: types and formats every floor reads; no compiler.
    "errors": 0, "_tvm": 0, "data": 0,
    "hardware": 1, "artifact_format": 1, "decoder": 1, "quant_format": 1,
    "plan": 2,
    # Kernels, speculation's data structures, pure cost models, the model frontends.
    "kernels": 3, "speculative": 3,
    "cost": 4, "frontend": 4,
    "planner": 5, "schedules": 5,
    "passes": 6, "runtime": 6,
    "codegen": 7,
    "profile": 8,
    # The workflows and the Python API, then the command line.
    "driver": 9,
    "cli": 10, "testing": 10, "__main__": 11,
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    """(importing module, imported module, line) for every hetcomp-internal import."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        module = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target == "hetcomp":  # "from .. import _tvm": the names are rooms
                    for a in node.names:
                        yield module, f"hetcomp.{a.name}", node.lineno
                elif target.startswith("hetcomp."):
                    yield module, target, node.lineno
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("hetcomp"):
                        yield module, a.name, node.lineno


def test_every_room_has_a_floor():
    rooms = {_room(m) for m, _, _ in _imports()} | {
        p.stem if p.is_file() else p.name for p in ROOT.iterdir()
        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    rooms.discard("__init__")
    assert rooms <= set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}"


def test_imports_run_down():
    upward = []
    for src, dst, line in _imports():
        a, b = _room(src), _room(dst)
        if a == "__init__" or a == b:  # the package's lazy API names every floor
            continue
        if FLOORS[b] >= FLOORS[a]:
            upward.append(f"{src}:{line} imports {dst} ({a} floor {FLOORS[a]} -> {b} "
                          f"floor {FLOORS[b]})")
    assert not upward, "\n".join(upward)


def test_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk finds lazy (in-function) imports too: a runtime module importing the driver
    inside a function is reported."""
    pkg = tmp_path / "hetcomp"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "x.py").write_text("def f():\n    from ..driver import bench\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    found = [(s, d) for s, d, _ in _imports()]
    assert ("hetcomp.runtime.x", "hetcomp.driver") in found
    with __import__("pytest").raises(AssertionError):
        test_imports_run_down()


def _python(code: str, env: dict | None = None) -> str:
    """What a fresh Python process running ``code`` prints (it must exit 0)."""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_runtime_only_imports_no_compiler():
    """Loading and generating (the driver's text API included) under a runtime-only TVM
    imports no compiler module (tvm.relax, tvm.tirx, tvm.s_tir), no hetcomp compiler room, and
    not torch (which tvm_ffi would import for its optional interop)."""
    code = ("import sys, hetcomp._tvm\n"
            "base = set(sys.modules)\n"
            "import hetcomp.runtime, hetcomp.driver.text, hetcomp.cli\n"
            "rooms = ('codegen', 'passes', 'schedules', 'kernels', 'profile')\n"
            "bad = sorted(m for m in set(sys.modules) - base if m.split('.')[:2] in "
            "[['tvm', x] for x in ('relax', 's_tir', 'tirx', 'te', 'target', 'driver')] "
            "or m.split('.')[:2] in [['hetcomp', r] for r in rooms])\n"
            "bad += ['torch'] if 'torch' in sys.modules else []\n"
            "print(','.join(bad))\n")
    out = _python(code, dict(os.environ, TVM_USE_RUNTIME_LIB="1"))
    assert out.strip() == "", f"compiler modules imported: {out}"


@pytest.mark.parametrize("torch_first", [False, True])
def test_tvm_is_imported_without_torch(torch_first):
    """tvm_ffi imports torch when it is installed, for its optional interop (~1 s and 100 MB
    a process; `hetcomp generate` 3.4 -> 1.9 s here): hetcomp hides torch while TVM is
    imported, so the CLI, the runtime and compile load none. A later ``import torch`` works
    and TVM takes its tensors (DLPack, as ``from_torch`` passes its parameters); torch
    imported first, TVM is imported as usual."""
    code = ("import sys\n"
            + ("import torch\n" if torch_first else "")
            + "import hetcomp.cli, hetcomp.runtime, hetcomp.driver.compile\n"
            "print('torch' in sys.modules)\n"
            "import torch, tvm\n"
            "t = torch.arange(6, dtype=torch.float32).reshape(2, 3)\n"
            "print(tvm.runtime.from_dlpack(t).numpy().tolist())\n")
    assert _python(code).split("\n")[:2] == [str(torch_first),
                                             "[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]"]


def test_the_driver_api_names_are_its_functions():
    """`from hetcomp.driver import bench, tune` gives the functions the README documents,
    also after their modules were imported (a module named like an API name became the
    package's attribute: both names gave modules)."""
    code = ("import hetcomp.driver.text, hetcomp.driver.benchmark, hetcomp.driver.tuning\n"
            "from hetcomp.driver import (CompileOptions, compile_model, load, generate, Chat,\n"
            "                            bench, tune, profile, calibrate_model)\n"
            "import types\n"
            "api = [CompileOptions, compile_model, load, generate, Chat, bench, tune, profile,\n"
            "       calibrate_model]\n"
            "print([getattr(f, '__name__', f) for f in api\n"
            "       if isinstance(f, types.ModuleType) or not callable(f)])\n"
            "print(bench.__module__, tune.__name__, profile.__name__)\n")
    assert _python(code).split("\n")[:2] == [
        "[]", "hetcomp.driver.benchmark tune_command profile_command"]
