"""Qwen2.5-Coder-0.5B-Instruct (the packaged GGUF: qwen2, Q5_0 + Q8_0 + Q4_K/Q6_K) against
transformers' own GGUF implementation: tokenizer ids, chat prompts, greedy tokens.

One float32 compile (54 s on two shared cores at load average ~5; the whole file about 2 min)
serves every test; transformers runs in float32 on the same file. float32, not float16: on
the haiku prompt the first token's top-2 logits are 0.011 apart and float16 weights move
logits by up to 0.008 (float32: < 1e-4), too close to call. Skipped with the install command
when the parts are absent.
"""

import numpy as np
import pytest

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend import load_model, models
from hetcomp.runtime import generate, load_artifact
from hetcomp.testing.reference import CHAT_PROMPTS

NAME = "qwen2.5-coder-0.5b"
NEW_TOKENS = 24

pytestmark = pytest.mark.skipif(not models.installed(NAME),
                                reason=f"needs: {models.MODELS[NAME].install_command}")

TEXTS = [
    "Hello, world! 12345 The quick brown fox.",
    "I'm   here\n\nnewline  tabs\tok, don't we'll they've HE'LL",
    "def f(x):\n    return x ** 2  # square\n\n\n\tif a!=b:\r\n  pass",
    "Ünïcödé façade — naïve café 東京 🚀 e\u0301",  # a combining accent: no NFC, as llama.cpp
    "<|im_start|>user\nhi<|im_end|><|fim_prefix|>x<|endoftext|>",
    "3.14159 1,000,000 0x1F 2024-01-01",
    'print("héllo")  // 注释 ;;; ===>   ',
]


@pytest.fixture(scope="module")
def qwen_loaded():
    return load_model(NAME)


@pytest.fixture(scope="module")
def qwen_artifact(tmp_path_factory, qwen_loaded):
    out = tmp_path_factory.mktemp("qwen") / "art"
    compile_model(CompileOptions(model=NAME, dtype="float32"), str(out), quiet=True,
                  weights=qwen_loaded)
    return load_artifact(str(out))


@pytest.fixture(scope="module")
def hf_reference():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hetcomp.testing.reference import transformers_gguf

    return transformers_gguf(models.model_path(NAME))


def _chat_ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_config_from_the_file(qwen_loaded):
    cfg, w, spec, _ = qwen_loaded
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (24, 14, 2, 64)
    assert cfg.qkv_bias and not cfg.tie_embeddings and cfg.rope_theta == 1e6
    assert spec["pre"] == "qwen2" and "<|im_start|>" in spec["chat_template"]
    assert np.abs(w["layers.0.bk"]).max() > 10  # Qwen2's large K biases are read


def test_tokenizer_matches_transformers(qwen_artifact, hf_reference):
    tok, _ = hf_reference
    for text in TEXTS:
        assert qwen_artifact.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False)
    for prompt in CHAT_PROMPTS:
        assert qwen_artifact.tokenizer.encode(prompt, chat=True) == _chat_ids(tok, prompt)


def test_greedy_ids_and_logits_match_transformers(qwen_artifact, hf_reference):
    import torch

    tok, model = hf_reference
    for prompt in CHAT_PROMPTS:
        ids = qwen_artifact.tokenizer.encode(prompt, chat=True)
        ours = generate(qwen_artifact, ids, max_new_tokens=NEW_TOKENS).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        assert ours == out.sequences[0, len(ids):].tolist(), prompt
        # The first token's logits (greedy: the scores are the raw logits).
        sess = qwen_artifact.new_session()
        _, _, logits = sess.verify(ids, np.arange(len(ids)), np.tril(np.ones((len(ids),) * 2)))
        theirs = out.scores[0][0].numpy()
        assert np.abs(logits.numpy()[-1] - theirs).max() / np.abs(theirs).max() < 1e-4
