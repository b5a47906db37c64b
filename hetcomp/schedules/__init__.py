"""Schedule rules (dlight-style: ``apply(func, target, tunable)`` returns a schedule or None)."""

from .cpu import cpu_rules

__all__ = ["cpu_rules"]
