"""Checks of GPU schedules without a GPU: the scheduled kernel run with its thread loops
serial on the CPU (against numpy), its thread bindings, and what nvcc's ptxas reports."""

from __future__ import annotations

import re
import subprocess

_BOUND = r'T\.thread_binding\(([^,]+), thread="(?:blockIdx|threadIdx)\.[xy]"\)'


def serial_threads(func, bound: int, what: str):
    """``func`` with its ``bound`` thread-bound loops (``what`` they are) as serial loops:
    the same schedule, runnable on the CPU. Sound where no reduction is thread-bound (each
    rule's test says why)."""
    import tvm

    text, n = re.subn(_BOUND, r"range(\1)", func.script())
    assert n == bound, what
    return tvm.script.from_source(text)


def thread_bindings(func) -> list[tuple[str, int]]:
    """``(thread tag, extent)`` of each thread-bound loop of a scheduled ``func``."""
    return [(tag, int(ext)) for ext, tag in re.findall(
        r'T\.thread_binding\(T\.int64\((\d+)\), thread="(\w+\.\w)"\)', func.script())]


def assert_no_stack(func, arch: str, tmp_path) -> str:
    """Compile ``func`` for CUDA ``arch`` and with nvcc: no stack frame and no spills (the
    accumulators stayed in registers). Returns ptxas' report."""
    from .. import _tvm

    c = _tvm.compiler()
    lib = c.compile(c.IRModule({"main": func}), target=c.Target({"kind": "cuda", "arch": arch}))
    (tmp_path / "k.cu").write_text(lib.mod.imports[0].inspect_source())
    proc = subprocess.run(["nvcc", "--cubin", f"-arch={arch}", "-Xptxas", "-v", "-o",
                           str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in proc.stderr
    return proc.stderr
