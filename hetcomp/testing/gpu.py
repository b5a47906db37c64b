"""Checks of GPU schedules without a GPU: the scheduled kernel run with its thread loops
serial on the CPU (against numpy), its thread bindings, what nvcc's ptxas reports, and a
whole CUDA artifact with every kernel so run (:func:`emulated_artifact`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess

_BOUND = r'T\.thread_binding\((.+?), thread="(?:blockIdx|threadIdx)\.[xyz]"\)'


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
    text = _without_barriers(text)
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


def _without_barriers(text: str) -> str:
    """A kernel's script with shared memory as plain buffers and barriers as nothing."""
    text = text.replace("T.alloc_shared(", "T.alloc_buffer(")
    return re.sub(r'T\.tvm_storage_sync\("shared".*\)$', "T.evaluate(0)", text,
                  flags=re.MULTILINE)


# A loop left for nvcc to unroll (``pragma_unroll_explicit: 0``): LLVM ignores the hint
# with a warning a loop.
_NVCC_UNROLL = r'T\.unroll\((.+?), annotations=\{"pragma_unroll_explicit": 0\}\)'


def cpu_form(func):
    """A GPU-scheduled kernel as the CPU runs it: every thread-bound loop serial (ascending),
    shared memory as plain buffers, barriers as nothing (:func:`thread_orders`' forward
    order, for any kernel), loops left for nvcc to unroll plain loops. Sound for our GPU
    kernels: a script kernel's phases are separate thread loops, and a rule's cross-thread
    partials are separate blocks before lowering."""
    import tvm

    text = re.sub(_NVCC_UNROLL, r"range(\1)", _without_barriers(func.script()))
    return tvm.script.from_source(re.sub(_BOUND, r"range(\1)", text))


def _cuda_target():
    from .. import _tvm

    return _tvm.compiler().Target({"kind": "cuda", "arch": "sm_90"})


def emulated_module(scheduled):
    """A scheduled GPU module (``codegen.build``'s ``scheduled``) with every kernel in its
    :func:`cpu_form`: the same Relax functions calling the same schedules, built for the
    host."""
    from .. import _tvm
    from ..schedules.apply import RULE_ATTR, rule_name
    from ..schedules.gpu import QuantTensorCoreLinearRule, TensorCoreLinearRule

    c = _tvm.compiler()
    out, converted = scheduled.clone(), 0
    untensorized = {rule_name(r): r for r in (TensorCoreLinearRule(tensorize=False),
                                              QuantTensorCoreLinearRule(tensorize=False))}
    for gv, func in scheduled.functions_items():
        if not isinstance(func, c.tir.PrimFunc):
            continue
        rule = untensorized.get(str(func.attrs.get(RULE_ATTR, "")))
        if rule is not None:
            # WMMA calls have no CPU form: the same schedule with its tiles as plain blocks
            func = rule.apply(func, _cuda_target(), False).mod["main"]
        if "T.thread_binding(" in func.script():
            out.update_func(gv, cpu_form(func))
            converted += 1
    if not converted:
        raise ValueError("not a GPU-scheduled module: no kernel binds threads")
    return out


@contextlib.contextmanager
def capture_scheduled(into: list):
    """Within it, each ``hetcomp compile`` (``compile_model``) appends the module it
    scheduled, before VM lowering, to ``into``."""
    from ..driver import compile as driver

    real = driver.build

    def build(mod, target, plan=None, cost=None, scheduled=None, **kwargs):
        scheduled = [] if scheduled is None else scheduled
        ex = real(mod, target, plan, cost, scheduled, **kwargs)
        into.append(scheduled[-1])
        return ex

    driver.build = build
    try:
        yield into
    finally:
        driver.build = real


def emulated_artifact(art_dir: str, scheduled, out_dir: str) -> str:
    """A copy of the CUDA artifact ``art_dir`` whose library is its ``scheduled`` module
    (:func:`capture_scheduled`) as :func:`emulated_module`, built for this CPU: the
    artifact's own kernels, schedules, fixed caches and calling convention, run by the
    runtime with every GPU thread serial. Its greedy output should equal the CPU
    artifact's (float sums in another order aside)."""
    from .. import _tvm
    from ..artifact_format import sha256_file
    from ..codegen.export import cpu_requirements
    from ..hardware import target_dict
    from ..passes.pipeline import vm_lowering_pipeline
    from . import edit_manifest

    c = _tvm.compiler()
    host = target_dict("host")
    ex = c.compile(emulated_module(scheduled), target=c.Target(host),
                   relax_pipeline=vm_lowering_pipeline())
    shutil.copytree(art_dir, out_dir)
    lib = os.path.join(out_dir, "lib.so")
    ex.export_library(lib)

    def edit(manifest):
        manifest.update(target="host", target_spec=host, cpu=cpu_requirements([host]),
                        units=[{"name": "cpu", "device": "cpu", "device_id": 0}])
        manifest["files"]["lib.so"] = {"bytes": os.path.getsize(lib),
                                       "sha256": sha256_file(lib)}

    edit_manifest(out_dir, edit)
    return out_dir


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
