"""Named compilation targets (0.27 takes targets as dicts; target strings are rejected)."""

from __future__ import annotations

from .._tvm import compiler
from ..errors import HetcompError


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (``-mcpu``), so vector ISA extensions are used."""
    import tvm_ffi

    f = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUName", allow_missing=True)
    return str(f()) if f is not None else "generic"


def target_dict(name: str) -> dict:
    if name == "host":
        return {"kind": "llvm", "mcpu": host_cpu_name()}
    if name == "aarch64":
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if name == "x86-64":
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    if name == "x86-64-v3":  # any x86 CPU since 2013 (AVX2, FMA): artifacts for other hosts
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
    if name == "cuda":  # the whole model on an NVIDIA GPU (Hopper), driven by a portable host
        return {"kind": "cuda", "arch": "sm_90", "host": target_dict("x86-64-v3")}
    raise HetcompError(f"unknown target {name!r} (known: {', '.join(TARGET_NAMES)})")


TARGET_NAMES = ("host", "aarch64", "x86-64", "x86-64-v3", "cuda")


def host_part(spec: dict) -> dict:
    """The LLVM target that runs a target's host code (the target itself for CPUs)."""
    return dict(spec["host"]) if "host" in spec else dict(spec)


def make_target(name: str):
    return compiler().Target(target_dict(name))


# The linker for each cross target (Debian's cross toolchains).
CROSS_LINKERS = {"aarch64": "aarch64-linux-gnu-gcc"}


def export_compiler(name: str):
    """``fcompile`` for ``export_library``: None (host cc) or the target's cross linker."""
    import shutil

    cc = CROSS_LINKERS.get(name)
    if cc is None:
        return None
    if shutil.which(cc) is None:
        raise HetcompError(f"--target {name} needs the cross linker {cc} "
                           "(apt-get install gcc-aarch64-linux-gnu)")
    return compiler().cc.cross_compiler(cc)
