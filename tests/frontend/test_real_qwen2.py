"""Qwen2.5-Coder-0.5B-Instruct (the packaged GGUF: qwen2, Q5_0 + Q8_0 + Q4_K/Q6_K) and
Qwen2.5-Coder-1.5B-Instruct (Q4_K + Q6_K, `make models` only) against transformers' own GGUF
implementation: tokenizer ids, 32 greedy tokens on four chat prompts, first-token logits.

One float32 compile per model (0.5B: 54 s on two shared cores at load average ~5, the whole
module about 2 min; 1.5B: ~100 s and 9.6 GB peak) serves its tests; transformers runs in
float32 on the same file. float32, not float16: on the haiku prompt the first token's top-2
logits are 0.011 apart and float16 weights move logits by up to 0.008 (float32: < 1e-4), too
close to call. Each model is skipped with its install command when its parts are absent.
"""

import numpy as np
import pytest

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend import load_model, models
from hetcomp.runtime import load_artifact
from hetcomp.testing.reference import CHAT_PROMPTS, assert_greedy_matches

NAME = "qwen2.5-coder-0.5b"
NEW_TOKENS = 32
PROMPTS = [*CHAT_PROMPTS, "Write a Python function that checks whether a number is prime."]
MODELS = [pytest.param(n, marks=pytest.mark.skipif(
    not models.installed(n), reason=f"needs: {models.MODELS[n].install_command}"))
    for n in (NAME, "qwen2.5-coder-1.5b")]

TEXTS = [
    "Hello, world! 12345 The quick brown fox.",
    "I'm   here\n\nnewline  tabs\tok, don't we'll they've HE'LL",
    "def f(x):\n    return x ** 2  # square\n\n\n\tif a!=b:\r\n  pass",
    "Ünïcödé façade — naïve café 東京 🚀 e\u0301",  # a combining accent: no NFC, as llama.cpp
    "<|im_start|>user\nhi<|im_end|><|fim_prefix|>x<|endoftext|>",
    "3.14159 1,000,000 0x1F 2024-01-01",
    'print("héllo")  // 注释 ;;; ===>   ',
    'Sure. <tool_call>\n{"name": "f"}\n</tool_call>',  # USER_DEFINED tokens: text, not special
]


@pytest.fixture(scope="module", params=MODELS)
def qwen_name(request):
    return request.param


@pytest.fixture(scope="module")
def qwen_loaded(qwen_name):
    return load_model(qwen_name)  # read lazily: the compile packs one tensor at a time


@pytest.fixture(scope="module")
def qwen_artifact(tmp_path_factory, qwen_name, qwen_loaded):
    out = tmp_path_factory.mktemp("qwen") / "art"
    compile_model(CompileOptions(model=qwen_name, dtype="float32", max_context=512,
                                 heads=None), str(out), quiet=True, weights=qwen_loaded)
    return load_artifact(str(out))


@pytest.fixture(scope="module")
def hf_reference(qwen_name, qwen_artifact):
    # (after qwen_artifact: the compile's peak memory passes before transformers loads)
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hetcomp.testing.reference import transformers_gguf

    return transformers_gguf(models.model_path(qwen_name))


def _chat_ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_config_from_the_file(qwen_name, qwen_loaded):
    cfg, w, spec, _ = qwen_loaded
    shape = {NAME: (24, 14, 2, 64), "qwen2.5-coder-1.5b": (28, 12, 2, 128)}[qwen_name]
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == shape
    assert cfg.qkv_bias and not cfg.tie_embeddings and cfg.rope_theta == 1e6
    assert spec["pre"] == "qwen2" and "<|im_start|>" in spec["chat_template"]
    # The file's eos is <|im_end|>; llama.cpp (and HF's generation_config) also end at
    # <|endoftext|>, and llama.cpp at the FIM pad, repository and file-separator tokens.
    assert [spec["tokens"][i] for i in spec["eos_token_ids"]] == [
        "<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
    assert np.abs(w["layers.0.bk"]).max() > 10  # Qwen2's large K biases are read


def test_tokenizer_matches_transformers(qwen_artifact, hf_reference):
    tok, _ = hf_reference
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert qwen_artifact.tokenizer.encode(text) == ids
        assert qwen_artifact.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    for prompt in PROMPTS:
        assert qwen_artifact.tokenizer.encode(prompt, chat=True) == _chat_ids(tok, prompt)


def test_greedy_ids_and_logits_match_transformers(qwen_artifact, hf_reference):
    """Our 32 greedy tokens are transformers' and the first token's logits agree, checked by
    teacher forcing (:func:`~hetcomp.testing.reference.assert_greedy_matches`)."""
    _, model = hf_reference
    for prompt in PROMPTS:
        assert_greedy_matches(qwen_artifact, model, qwen_artifact.tokenizer.encode(prompt, chat=True),
                              NEW_TOKENS)
