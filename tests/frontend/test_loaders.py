"""GGUF and HF folder import, end to end through compile, against numpy on the stored weights."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend import load_model
from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, byte_tokenizer_spec
from hetcomp.testing import numpy_llama as ref
from hetcomp.testing.gguf_writer import write_gguf


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_roundtrip(tmp_path, qtype):
    w = random_weights(TINY, seed=5)
    stored = write_gguf(tmp_path / "m.gguf", TINY, w, byte_tokenizer_spec(TINY.vocab_size),
                        qtype=qtype)
    cfg, loaded, spec, _ = load_model(str(tmp_path / "m.gguf"), max_context=128)
    assert cfg.num_heads == TINY.num_heads and cfg.num_kv_heads == TINY.num_kv_heads
    assert cfg.tie_embeddings
    for name, arr in stored.items():
        np.testing.assert_array_equal(loaded[name], arr, err_msg=name)
    if qtype == "F32":  # the permutation is undone exactly
        np.testing.assert_array_equal(loaded["layers.1.wk"], w["layers.1.wk"])
    compile_model(CompileOptions(model=str(tmp_path / "m.gguf"), max_context=128),
                  str(tmp_path / "art"), quiet=True)
    art = load_artifact(str(tmp_path / "art"))
    prompt = [4, 80, 120, 33]
    _, hidden = art.new_session().prefill(prompt)
    _, ref_hidden = ref.forward(cfg, stored, prompt)
    np.testing.assert_allclose(hidden.numpy()[0], ref_hidden[-1], rtol=1e-4, atol=1e-4)


def test_open_gguf_reads_what_the_gguf_reader_reads(tmp_path):
    """open_gguf parses over the file as a plain array, not numpy's memmap (much faster):
    every field and tensor as gguf.GGUFReader reads them, the tensors still the file's."""
    import gguf

    from hetcomp.frontend.gguf_loader import open_gguf

    path = str(tmp_path / "m.gguf")
    write_gguf(path, TINY, random_weights(TINY, seed=5), byte_tokenizer_spec(TINY.vocab_size),
               qtype="Q8_0")
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, f in theirs.fields.items():
        assert ours.fields[key].types == f.types, key
        np.testing.assert_equal(ours.fields[key].contents(), f.contents(), err_msg=key)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.tensor_type, a.data_offset, a.n_bytes) == (b.tensor_type, b.data_offset,
                                                               b.n_bytes), b.name
        np.testing.assert_array_equal(a.data, b.data, err_msg=b.name)
        assert type(a.data) is np.ndarray and np.shares_memory(a.data, ours.data)


def test_gguf_weights_are_read_when_packed_and_name_their_source(tmp_path):
    """load_model reads no tensor until asked (a 1.5B model's float32 copy is 7 GB); packing
    reads each one and a quantized pack names the file's type of what it converted."""
    from hetcomp.frontend.lazy import LazyWeights, parameter_count
    from hetcomp.frontend.weights import pack_weights

    w = random_weights(TINY, seed=5)
    write_gguf(tmp_path / "m.gguf", TINY, w, byte_tokenizer_spec(TINY.vocab_size), qtype="F16")
    cfg, loaded, _, _ = load_model(str(tmp_path / "m.gguf"), max_context=128, keep_quant=True)
    assert isinstance(loaded, LazyWeights)
    assert parameter_count(loaded) == sum(a.size for a in w.values())
    assert loaded.shape("layers.0.w_gate") == w["layers.0.w_gate"].shape
    assert loaded.source("layers.0.w_gate") == "f16" and loaded.source("norm") == "f32"
    report: dict = {}
    pack_weights(cfg, loaded, "q8_0", report)
    # Seven matrices a layer and the tied embedding, all stored F16 in this file.
    assert report == {"converted": {"f16->q8_0": 7 * TINY.num_layers + 1}}


def test_gguf_generation_ends_where_llama_cpp_ends_it(tmp_path):
    """The file's eos first, then every token llama.cpp ends generation at by its text,
    whatever its id, then its FIM pad, repository and file-separator tokens (the file's
    tokenizer.ggml.fim_*_token_id, else found by text); look-alikes (another case, the
    FIM prefix) do not end it."""
    spec = byte_tokenizer_spec(TINY.vocab_size)  # 0 <|endoftext|>, 2 <|im_end|> (eos)
    named = {300: "<|eot_id|>", 301: "_<EOT>", 302: "<end_of_turn>", 303: "<|END_OF_TEXT|>",
             304: "<|fim_pad|>", 305: "<end_of_utterance>", 306: "<|fim_prefix|>",
             307: "<reponame>", 308: "<|file_sep|>", 309: "<|FIM_PAD|>"}
    for i, text in named.items():
        spec["tokens"][i] = text
    path = tmp_path / "m.gguf"
    write_gguf(path, TINY, random_weights(TINY, seed=0), spec)
    _, _, loaded, _ = load_model(str(path))
    assert loaded["eos_token_ids"] == [2, 0, 300, 301, 302, 305, 304, 307, 308]
    # The file's FIM ids win over the texts (llama.cpp looks for a text only without one).
    write_gguf(path, TINY, random_weights(TINY, seed=0), spec,
               edit=lambda wr: wr.add_uint32("tokenizer.ggml.fim_sep_token_id", 310))
    _, _, loaded, _ = load_model(str(path))
    assert loaded["eos_token_ids"] == [2, 0, 300, 301, 302, 305, 304, 307, 310]


def test_hf_folder(tmp_path):
    from hetcomp.frontend.tokenizer import build_tokenizer

    w = random_weights(TINY, seed=7)
    hf = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"]}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
             "w_down": "mlp.down_proj"}
    for i in range(TINY.num_layers):
        for ours, theirs in names.items():
            hf[f"model.layers.{i}.{theirs}.weight"] = w[f"layers.{i}.{ours}"]
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": TINY.hidden_size, "intermediate_size": TINY.intermediate_size,
        "num_hidden_layers": TINY.num_layers, "num_attention_heads": TINY.num_heads,
        "num_key_value_heads": TINY.num_kv_heads, "vocab_size": TINY.vocab_size,
        "rope_theta": TINY.rope_theta, "rms_norm_eps": TINY.norm_eps,
        "max_position_embeddings": 128, "tie_word_embeddings": True}))
    (tmp_path / "tokenizer.json").write_text(
        build_tokenizer(byte_tokenizer_spec(TINY.vocab_size)).to_str())
    compile_model(CompileOptions(model=str(tmp_path)), str(tmp_path / "art"), quiet=True)
    art = load_artifact(str(tmp_path / "art"))
    prompt = [40, 41, 42, 300, 2]
    nxt, hidden = art.new_session().prefill(prompt)
    logits, ref_hidden = ref.forward(TINY, w, prompt)
    assert nxt == int(np.argmax(logits[-1]))
    np.testing.assert_allclose(hidden.numpy()[0], ref_hidden[-1], rtol=1e-4, atol=1e-4)
    assert art.tokenizer.decode(art.tokenizer.encode("hi there")) == "hi there"
