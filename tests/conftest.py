import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hetcomp.codegen.compile import CompileOptions, compile_model  # noqa: E402
from hetcomp.frontend.config import LlamaConfig  # noqa: E402
from hetcomp.frontend.weights import random_weights  # noqa: E402

TINY = LlamaConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, vocab_size=320, max_context=128, rope_theta=10000.0)


def byte_tokenizer_spec(vocab_size: int) -> dict:
    """A byte-level BPE vocabulary with no merges, padded to ``vocab_size`` (tiny models)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    types = [3, 3, 3] + [1] * (vocab_size - 3)
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "merges": [],
            "token_type": types, "eos_token_id": 2, "bos_token_id": 1,
            "add_bos_token": False, "chat_template": None}


def compile_tiny(tmp_path_factory, cfg=TINY, dtype="float32", seed=0, name="tiny"):
    w = random_weights(cfg, seed=seed)
    out = tmp_path_factory.mktemp(name) / "art"
    compile_model(CompileOptions(model="tiny.gguf", dtype=dtype, max_context=cfg.max_context),
                  str(out), quiet=True, weights=(cfg, w, byte_tokenizer_spec(cfg.vocab_size),
                                                  __file__))
    return str(out), w


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return compile_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_weights():
    from hetcomp.frontend import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, smollm2_weights):
    out = tmp_path_factory.mktemp("smollm2") / "art"
    compile_model(CompileOptions(model="smollm2"), str(out), quiet=True, weights=smollm2_weights)
    return str(out)


def tree_mask(parents):
    """Ancestor-or-self mask of a tree given each node's parent (-1 for the root)."""
    w = len(parents)
    m = np.zeros((w, w), "int32")
    for i in range(w):
        j = i
        while j >= 0:
            m[i, j] = 1
            j = parents[j]
    return m


def depths(parents):
    d = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return np.array(d)
