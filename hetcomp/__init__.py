"""hetcomp: a TVM-based compiler for speculative LLM decoding across processing units."""

from .codegen.compile import CompileOptions, compile_model
from .errors import HetcompError
from .frontend import from_torch, load_model
from .runtime import generate, load_artifact

__version__ = "0.1.0"

__all__ = ["CompileOptions", "compile_model", "HetcompError", "load_model", "from_torch",
           "load_artifact", "generate"]
