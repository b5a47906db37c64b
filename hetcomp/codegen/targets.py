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
    raise HetcompError(f"unknown target {name!r} (known: host, aarch64, x86-64)")


def make_target(name: str):
    return compiler().Target(target_dict(name))
