"""Compiler-side target helpers: TVM ``Target`` objects and each target's linker.

The targets themselves are data in :mod:`hetcomp.hardware`.
"""

from __future__ import annotations

import shutil

from .._tvm import compiler
from ..errors import HetcompError
from ..hardware import target_dict


def make_target(name: str, **kwargs):
    return compiler().Target(target_dict(name, **kwargs))


# The linker for each cross target (Debian's cross toolchains).
CROSS_LINKERS = {"aarch64": "aarch64-linux-gnu-gcc", "aarch64-dotprod": "aarch64-linux-gnu-gcc"}


def cross_linker(name: str) -> str | None:
    """The cross linker ``--target name`` links with (None: the host's cc); one line of
    error where it is not installed (compile asks before any work)."""
    cc = CROSS_LINKERS.get(name)
    if cc is not None and shutil.which(cc) is None:
        raise HetcompError(f"--target {name} needs the cross linker {cc} "
                           "(apt-get install gcc-aarch64-linux-gnu)")
    return cc


def export_compiler(name: str):
    """``fcompile`` for ``export_library``: None (host cc) or the target's cross linker."""
    cc = cross_linker(name)
    return None if cc is None else compiler().cc.cross_compiler(cc)
