"""Gemma 3 270M (the packaged GGUF: gemma3, Q8_0 + Q5_0 + Q4_K/Q6_K) against transformers' own
GGUF implementation: tokenizer ids and decoded text, first-token logits, greedy tokens on raw
text prompts (the file has no chat template).

One float32 compile at a 128-token context (``hetcomp compile --model gemma3-270m``, the
command issue #18 asks for, run in-process) serves every test, and ``hetcomp generate`` and
``inspect`` run on its artifact in real processes; transformers runs in float32 on the same
file. The prompts stay inside the 512-key window (tests/frontend/test_gemma3.py checks the
window past its end on a tiny model). Skipped with the install command when the parts are
absent.
"""

import json

import numpy as np
import pytest

from hetcomp.cli import main
from hetcomp.frontend import models
from hetcomp.frontend.gguf_loader import open_gguf, read_config
from hetcomp.runtime import load_artifact
from hetcomp.testing import run_cli
from hetcomp.testing.reference import assert_greedy_matches

NAME = "gemma3-270m"
NEW_TOKENS = 32

pytestmark = pytest.mark.skipif(not models.installed(NAME),
                                reason=f"needs: {models.MODELS[NAME].install_command}")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
]
TEXTS = [
    "Hello, world! 12345 The quick brown fox.",
    "I'm   here\n\nnewline  tabs\tok, don't we'll they've HE'LL",
    "def f(x):\n    return x ** 2  # square\n\n\n\tif a!=b:\r\n  pass",
    "Ünïcödé façade — naïve café 東京 🚀 e\u0301",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos>x<eos><pad>",
    "3.14159 1,000,000 0x1F 2024-01-01 99999999",
    'print("héllo")  // 注释 ;;; ===>   ',
    "  leading spaces and trailing   ",
    "<div><span>html</span></div>\u0000\u0001 \x7f ☃ 𝔘𝔫𝔦",
]


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    # The command's own code, in this process (a process start and TVM's import saved);
    # `generate` and `inspect` below run in real processes, with the runtime only.
    out = tmp_path_factory.mktemp("gemma3") / "art"
    # (without its packaged Medusa heads: tests/frontend/test_real_gemma3_medusa.py speculates)
    assert main(["compile", "--model", NAME, "--dtype", "float32", "--max-context", "128",
                 "--no-heads", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def gemma_artifact(gemma_path):
    return load_artifact(str(gemma_path))


def test_cli_generate_and_inspect(gemma_path):
    rc, out, err = run_cli("generate", gemma_path, "--prompt", PROMPTS[0], "--max-new-tokens",
                           8, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["prompt_ids"][0] == 2 and len(res["ids"]) == 8 and res["text"].strip()
    rc, out, err = run_cli("inspect", gemma_path, "--json")
    assert rc == 0, err
    info = json.loads(out)
    rules = {k["name"].removesuffix("_w1"): k["rule"] for k in info["kernels"]
             if k["function"] == "verify_w1"}
    assert {"qk_norm", "gelu_mul", "rms_norm_res", "attention_win512", "attention",
            "rope_table_win"} <= set(rules)
    assert not [n for n, r in rules.items() if "AsWritten" in r]  # every kernel scheduled


@pytest.fixture(scope="module")
def hf_reference():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hetcomp.testing.reference import transformers_gguf

    return transformers_gguf(models.model_path(NAME))


def test_config_and_norms_from_the_file(gemma_artifact, hf_reference):
    # (gemma_artifact first: the compile's peak memory passes before transformers loads)
    reader = open_gguf(models.model_path(NAME))
    cfg = read_config(reader)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.tie_embeddings and cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert [i for i in range(18) if not cfg.layer_window(i)] == [5, 11, 17]
    assert cfg.sliding_window == 512 and cfg.embed_scale == 640 ** 0.5
    _, model = hf_reference
    hf = model.config
    assert hf.layer_types == ["full_attention" if not cfg.layer_window(i)
                              else "sliding_attention" for i in range(18)]
    assert hf.query_pre_attn_scalar == cfg.head_dim and hf.final_logit_softcapping is None
    assert hf.hidden_activation == "gelu_pytorch_tanh" and hf.sliding_window == 512
    # The file stores Gemma's 1 + w (the converter's), which the norm kernel multiplies by.
    tensors = {t.name: t for t in reader.tensors}
    layer = model.model.layers[0]
    for name, hf_norm in (("attn_norm", layer.input_layernorm), ("attn_q_norm",
                                                                  layer.self_attn.q_norm)):
        stored = np.asarray(tensors[f"blk.0.{name}.weight"].data, dtype=np.float32)
        np.testing.assert_allclose(stored, hf_norm.weight.detach().numpy() + 1, atol=1e-6)


def test_tokenizer_matches_transformers(gemma_artifact, hf_reference):
    tok, _ = hf_reference
    ours = gemma_artifact.tokenizer
    for text in TEXTS + PROMPTS:
        ids = ours.encode(text)
        assert ids == tok.encode(text), text  # BOS first, as add_bos_token says
        assert ours.decode(ids) == tok.decode(ids, skip_special_tokens=True), text
    assert ours.eos_token_ids == [1, 106]  # <eos>, and llama.cpp's <end_of_turn>


def test_greedy_ids_and_logits_match_transformers(gemma_artifact, hf_reference):
    """Our 32 greedy tokens are transformers' and the first token's logits agree, checked by
    teacher forcing (4 forwards instead of 128 decode steps: ~1 min less here)."""
    _, model = hf_reference
    for prompt in PROMPTS:
        assert_greedy_matches(gemma_artifact, model, gemma_artifact.tokenizer.encode(prompt),
                              NEW_TOKENS)


def test_tokenizer_matches_llama_cpp(gemma_artifact):
    """llama.cpp's own SentencePiece tokenizer (llm_tokenizer_spm: merges by score) on the
    same file agrees too."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=models.model_path(NAME), vocab_only=True, verbose=False)
    for text in TEXTS + PROMPTS:
        assert gemma_artifact.tokenizer.encode(text) == llm.tokenize(
            text.encode(), add_bos=True, special=True), text


def test_streamed_text_is_the_result_across_byte_fallback_runs(gemma_artifact):
    """Gemma spells rare characters as runs of byte pieces, and its decoder turns a run that is
    not UTF-8 into one U+FFFD a byte, its whole characters too: a character shown while its
    run was open could later become U+FFFD in the result. Streamed a token at a time, the
    pieces are always a prefix of the result's text and join to it, whatever token the
    generation stops at."""
    from hetcomp.runtime.generate import TextStream

    tok = gemma_artifact.tokenizer
    ids = tok.encode_text("a𠀀𠀁 b\u00e9")[1:]  # (no BOS: generated ids)
    assert sum(i in tok.byte_token_ids for i in ids) == 8  # two 4-byte runs
    for stop in range(1, len(ids) + 1):
        whole = tok.decode(ids[:stop])
        stream, shown = TextStream(tok), ""
        for i in ids[:stop]:
            shown += stream.push([i])
            assert whole.startswith(shown), (stop, shown, whole)
        assert shown + stream.finish() == whole, stop
    stream = TextStream(tok)  # a whole character, then a run the next byte breaks
    assert stream.push(ids[:5]) == "a"
    assert stream.push(ids[5:6]) + stream.push(tok.encode_text(" b")[1:]) == tok.decode(
        ids[:6] + tok.encode_text(" b")[1:])[1:]
