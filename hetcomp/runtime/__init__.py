"""Load an artifact with the TVM runtime only and run the (speculative) decode loop."""

from .artifact import Artifact, load_artifact
from .generate import GenerationResult, generate
from .weights import attach_weights

__all__ = ["Artifact", "load_artifact", "generate", "GenerationResult", "attach_weights"]
