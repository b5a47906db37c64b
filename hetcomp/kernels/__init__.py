"""Kernel definitions (TE and TVMScript) that the model is built from, each marked with its op
kind (``hetcomp.op_kind``) so that schedule rules and cost models find it; no scheduling here."""
