"""hetcomp: a TVM-based compiler for speculative LLM decoding across processing units.

Names are imported lazily so that loading and running an artifact needs only the TVM runtime
(``TVM_USE_RUNTIME_LIB=1``), never the compiler.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "CompileOptions": "hetcomp.driver.compile",
    "compile_model": "hetcomp.driver.compile",
    "HetcompError": "hetcomp.errors",
    "load_model": "hetcomp.frontend",
    "from_torch": "hetcomp.frontend",
    "load_artifact": "hetcomp.runtime",
    "generate": "hetcomp.runtime",
    "Chat": "hetcomp.driver.text",
    "HeteroPlan": "hetcomp.plan",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'hetcomp' has no attribute {name!r}")
