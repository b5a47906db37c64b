"""Schedule rules (dlight-style: ``apply(func, target, tunable)`` returns a schedule or None)."""

from .arm import arm_rules
from .cpu import cpu_rules
from .x86 import x86_rules

__all__ = ["cpu_rules", "llvm_rules"]


def llvm_rules():
    """The rule list of every LLVM CPU target: the ISA rules first (each applies only to a
    target with its vector extension: x86 AVX-512/AVX2+FMA, aarch64 NEON), then the generic
    CPU rules."""
    return [*x86_rules(), *arm_rules(), *cpu_rules()]
