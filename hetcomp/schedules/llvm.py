"""The rule list of LLVM CPU targets.

Not in the ``hetcomp.schedules`` package init: importing the ISA rules registers their tensor
intrinsics, and MetaSchedule's builder workers import that package under a time limit.
"""

from __future__ import annotations

from .arm import arm_rules
from .cpu import cpu_rules
from .x86 import x86_rules


def llvm_rules():
    """The ISA rules first (each applies only to a target with its vector extension: x86
    AVX-512 or AVX2+FMA, aarch64 NEON), then the generic CPU rules."""
    return [*x86_rules(), *arm_rules(), *cpu_rules()]
