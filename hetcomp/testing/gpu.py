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


_BOUND_LOOP = re.compile(r'^(\s*)for (\w+) in T\.thread_binding\((.+), thread="\w+\.\w"\):$')


def thread_orders(func) -> dict:
    """``func``'s GPU form run on the CPU in two thread orders: ``"forward"`` (every
    thread-bound loop serial, ascending) and ``"reverse"`` (descending). Between two barriers
    a GPU runs its threads in any order, so a kernel whose threads in one phase read what
    another writes there gives different results in the two; barriers stay sound, as each
    phase is its own thread loop (a script kernel's are)."""
    import tvm

    text = func.script()
    # TVMScript prints a one-element buffer's element as the bare name (``out = x``), which
    # parses back as a rebinding: name the element again.
    shapes = {str(p.name): list(p.shape) for p in func.params if hasattr(p, "shape")}
    ones = [name for name, shape in shapes.items()
            if len(shape) == 1 and getattr(shape[0], "value", None) == 1]
    body = text.index("T.func_attr(")
    for name in ones:
        text = text[:body] + re.sub(rf"\b{name}\b(?!\[)", f"{name}[0]", text[body:])
    # Shared memory as plain buffers, barriers as nothing: the phase loops stay in order.
    text = text.replace("T.alloc_shared(", "T.alloc_buffer(")
    text = re.sub(r'T\.tvm_storage_sync\("shared".*\)$', "T.evaluate(0)", text, flags=re.MULTILINE)
    forward = re.sub(_BOUND, r"range(\1)", text)
    lines = []
    for line in text.splitlines():
        m = _BOUND_LOOP.match(line)
        if m is None:
            lines.append(line)
            continue
        indent, var, extent = m.groups()
        lines.append(f"{indent}for {var}_rev in range({extent}):")
        lines.append(f"{indent}    {var} = {extent} - {var}_rev - 1")
    return {"forward": tvm.script.from_source(forward),
            "reverse": tvm.script.from_source("\n".join(lines))}


def kernel_library(func, target: str = "host"):
    """``func`` alone, compiled as ``main`` for ``target`` (a :func:`~hetcomp.hardware.
    target_dict` name): its CPU form to run, or its GPU form to read
    (:func:`~hetcomp.codegen.build.cuda_source`)."""
    from .. import _tvm
    from ..hardware import target_dict

    c = _tvm.compiler()
    return c.compile(c.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=target_dict(target))


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
