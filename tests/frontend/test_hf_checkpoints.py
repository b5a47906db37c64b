"""HF checkpoint folders as transformers writes them, and the config values hetcomp refuses.

The real-model tests save the packaged SmolLM2 GGUF with transformers' own ``save_pretrained``
(RoPE base under ``rope_parameters``, ``chat_template.jinja``, sharded through
``model.safetensors.index.json``, bf16), so they read what the world produces, not what our
code wrote.
"""

import dataclasses
import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from hetcomp import CompileOptions, HetcompError, compile_model, generate, load_artifact, load_model
from hetcomp.frontend.tokenizer import TokenizerInfo, build_tokenizer
from hetcomp.frontend.weights import random_weights
from hetcomp.testing import TINY, assert_one_line_error, byte_tokenizer_spec, run_cli
from hetcomp.testing.gguf_writer import write_gguf
from hetcomp.testing.reference import CHAT_PROMPTS

TEXTS = [
    "Hello, world! 12345 The quick brown fox.",
    "I'm   here\n\nnewline  tabs\tok, don't we'll they've",
    "Ünïcödé façade — naïve café 東京 🚀",
    "<|im_start|>user\nhi<|im_end|>",
]
NEW_TOKENS = 24
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
          "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
          "w_down": "mlp.down_proj"}






def manifest_config(art_dir) -> dict:
    with open(os.path.join(art_dir, "manifest.json")) as fh:
        return json.load(fh)["config"]


# --- The real model, saved by transformers -------------------------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """SmolLM2 saved by transformers: float32 in one file, float32 in 100 MB shards, bf16."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    from hetcomp.testing.reference import transformers_smollm2

    tok, model = transformers_smollm2()
    # A model read from GGUF carries the GGUF "quantizer", which refuses save_pretrained; its
    # weights are already the dequantized float32 ones, so drop it and save them as they are.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    root = tmp_path_factory.mktemp("hf")
    dirs = {k: root / k for k in ("single", "sharded", "bf16")}
    model.save_pretrained(dirs["single"])
    model.save_pretrained(dirs["sharded"], max_shard_size="100MB")
    model.to(torch.bfloat16).save_pretrained(dirs["bf16"])
    for d in dirs.values():
        tok.save_pretrained(d)
    return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(scope="module")
def hf_reference(hf_folders):
    """transformers on the float32 folder it wrote."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folders["single"])
    model = AutoModelForCausalLM.from_pretrained(hf_folders["single"], dtype="float32")
    return tok, model.eval()


@pytest.fixture(scope="module")
def hf_artifacts(hf_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_art")
    return {k: compile_model(CompileOptions(model=d, max_context=256), str(root / k), quiet=True)
            for k, d in hf_folders.items()}


def test_transformers_folders_are_what_transformers_5_writes(hf_folders):
    """The layout that broke the loader: if transformers changes it again, say so here."""
    single, sharded = hf_folders["single"], hf_folders["sharded"]
    with open(os.path.join(single, "config.json")) as fh:
        cfg = json.load(fh)
    assert cfg["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert "rope_theta" not in cfg
    assert os.path.isfile(os.path.join(single, "chat_template.jinja"))
    with open(os.path.join(single, "tokenizer_config.json")) as fh:
        assert "chat_template" not in json.load(fh)
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))


def test_folders_load_the_gguf_weights(hf_folders, smollm2_weights):
    gcfg, gw, _, _ = smollm2_weights
    for kind in ("single", "sharded"):
        cfg, w, spec, _ = load_model(hf_folders[kind])
        assert cfg.rope_theta == gcfg.rope_theta == 100000.0
        assert cfg.norm_eps == gcfg.norm_eps and cfg.head_dim == gcfg.head_dim
        assert spec["eos_token_ids"] == [2]
        assert sorted(w) == sorted(gw)
        for name, arr in gw.items():
            np.testing.assert_array_equal(w[name], arr, err_msg=f"{kind} {name}")
    _, w, _, _ = load_model(hf_folders["bf16"])
    for name in ("embed", "layers.3.wk", "layers.29.w_down", "norm"):
        rounded = gw[name].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(w[name], rounded, err_msg=name)


def test_compiled_config_reads_rope_parameters(hf_artifacts):
    for kind, art in hf_artifacts.items():
        assert manifest_config(art)["rope_theta"] == 100000.0, kind
        assert load_artifact(art).tokenizer.eos_token_ids == [2]


def test_tokenizer_matches_transformers(hf_artifacts, hf_reference, smollm2_artifact):
    tok, _ = hf_reference
    ours, gguf = load_artifact(hf_artifacts["single"]), load_artifact(smollm2_artifact)
    for text in TEXTS:
        assert ours.tokenizer.encode(text) == tok.encode(text) == gguf.tokenizer.encode(text)
    for prompt in CHAT_PROMPTS:
        theirs = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=True)
        theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
        assert ours.tokenizer.encode(prompt, chat=True) == theirs, prompt
        assert gguf.tokenizer.encode(prompt, chat=True) == theirs, prompt


def test_greedy_ids_equal_gguf_and_transformers(hf_artifacts, hf_reference, smollm2_artifact):
    import torch

    _, model = hf_reference
    gguf = load_artifact(smollm2_artifact)
    arts = {k: load_artifact(hf_artifacts[k]) for k in ("single", "sharded")}
    for prompt in CHAT_PROMPTS:
        ids = gguf.tokenizer.encode(prompt, chat=True)
        expected = generate(gguf, ids, max_new_tokens=NEW_TOKENS).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out[0, len(ids):].tolist() == expected, prompt
        for kind, art in arts.items():
            assert art.tokenizer.encode(prompt, chat=True) == ids
            assert generate(art, ids, max_new_tokens=NEW_TOKENS).ids == expected, (kind, prompt)


def test_cli_chat_on_hf_artifacts(hf_artifacts, cli):
    """``generate --chat`` finds the template transformers wrote to chat_template.jinja (the
    first in a real process, loading with the runtime only; the second in-process)."""
    for kind, run in (("sharded", run_cli), ("bf16", cli)):
        rc, out, err = run("generate", hf_artifacts[kind], "--chat", "--prompt",
                           CHAT_PROMPTS[0], "--max-new-tokens", 16, "--json")
        assert rc == 0, err
        res = json.loads(out)
        art = load_artifact(hf_artifacts[kind])
        assert res["prompt_ids"] == art.tokenizer.encode(CHAT_PROMPTS[0], chat=True)
        assert 1 <= len(res["ids"]) <= 16 and res["text"].strip(), (kind, res)


# --- Tiny folders: config values, EOS ids, dtypes -------------------------------------------


def hf_config(cfg=TINY, **overrides) -> dict:
    """config.json as transformers 5 writes it for ``cfg``."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size,
         "head_dim": cfg.head_dim, "hidden_act": "silu", "attention_bias": False,
         "mlp_bias": False, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": 128,
         "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
         "tie_word_embeddings": True, "eos_token_id": 2, "bos_token_id": 1}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


def hf_tensors(w) -> dict:
    hf = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"]}
    if "lm_head" in w:
        hf["lm_head.weight"] = w["lm_head"]
    for i in range(TINY.num_layers):
        for ours, theirs in _LAYER.items():
            hf[f"model.layers.{i}.{theirs}.weight"] = w[f"layers.{i}.{ours}"]
    return hf


def write_tiny_hf(folder, config=None, tensors=None, shards=1, generation=None):
    """A tiny HF folder: safetensors (``shards`` > 1: with an index), config, tokenizer."""
    os.makedirs(folder, exist_ok=True)
    tensors = tensors if tensors is not None else hf_tensors(random_weights(TINY, seed=3))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k::shards]}
            save_file(part, os.path.join(folder, file))
            weight_map.update(dict.fromkeys(part, file))
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config or hf_config(), fh)
    if generation is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as fh:
            json.dump(generation, fh)
    with open(os.path.join(folder, "tokenizer.json"), "w") as fh:
        fh.write(build_tokenizer(byte_tokenizer_spec(TINY.vocab_size)).to_str())
    return str(folder)


def test_rope_theta_from_either_place(tmp_path):
    new = write_tiny_hf(tmp_path / "v5")
    assert load_model(new)[0].rope_theta == 5000.0
    old = write_tiny_hf(tmp_path / "v4", hf_config(rope_parameters=None, rope_theta=7000.0,
                                                   rope_scaling=None))
    assert load_model(old)[0].rope_theta == 7000.0


@pytest.mark.parametrize("overrides, field", [
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}},
     "rope_type"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default",
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"rope_parameters": None, "rope_theta": 5e5,  # Llama 3.1 as transformers 4 wrote it
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_type"),
    ({"rope_parameters": None, "rope_theta": 1e4,
      "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
    # Saved by transformers 5, then given a scaling by hand: transformers reads rope_scaling.
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope_type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "architecture"),
    ({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]},
     "gemma3 from its GGUF"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
     "use_sliding_window"),
])
def test_refuses_what_it_does_not_implement(tmp_path, overrides, field):
    folder = write_tiny_hf(tmp_path, hf_config(**overrides))
    with pytest.raises(HetcompError, match=field):
        load_model(folder)


@pytest.mark.parametrize("overrides, needle", [
    ({"head_dim": 16.0}, "head_dim=16.0"),  # crashed inside TVM: shapes must be integers
    ({"hidden_size": True}, "hidden_size=True"),  # was taken as 1
    ({"rms_norm_eps": float("inf")}, "rope_theta and norm_eps must be positive and finite"),
    ({"rope_theta": float("inf"), "rope_parameters": None}, "positive and finite"),
])
def test_config_values_that_are_no_sizes_are_refused(tmp_path, overrides, needle):
    folder = write_tiny_hf(tmp_path, hf_config(**overrides))
    with pytest.raises(HetcompError, match=re.escape(needle)):
        load_model(folder)


def test_tied_config_with_another_lm_head_is_refused(tmp_path):
    """A tied config whose checkpoint holds a different LM head is two models (transformers
    5 keeps the file's head, 4.x ties it): refused, not silently tied. The same head as the
    embedding (a save that kept both) loads tied."""
    w = random_weights(dataclasses.replace(TINY, tie_embeddings=False), seed=3)
    other = write_tiny_hf(tmp_path / "other", hf_config(tie_word_embeddings=True), hf_tensors(w))
    with pytest.raises(HetcompError, match="different lm_head.weight"):
        load_model(other)
    w["lm_head"] = w["embed"].copy()
    same = write_tiny_hf(tmp_path / "same", hf_config(tie_word_embeddings=True), hf_tensors(w))
    cfg, loaded, _, _ = load_model(same)
    assert cfg.tie_embeddings and "lm_head" not in loaded


def test_null_config_values_are_transformers_defaults(tmp_path):
    """`null` in config.json means the default (as `"rope_scaling": null` does); a value of
    the wrong kind is one line, not a traceback."""
    folder = write_tiny_hf(tmp_path / "null", {**hf_config(), "rms_norm_eps": None,
                                              "max_position_embeddings": None,
                                              "rope_parameters": {"rope_theta": None},
                                              "rope_scaling": None})
    cfg = load_model(folder)[0]
    assert (cfg.norm_eps, cfg.max_context, cfg.rope_theta) == (1e-6, 2048, 10000.0)
    bad = write_tiny_hf(tmp_path / "bad", hf_config(max_position_embeddings=[128]))
    with pytest.raises(HetcompError, match="inconsistent config.json"):
        load_model(bad)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_tensors(tmp_path, dtype):
    w = random_weights(TINY, seed=4)
    folder = write_tiny_hf(tmp_path, tensors={k: v.astype(dtype) for k, v in hf_tensors(w).items()})
    _, loaded, _, _ = load_model(folder)
    for name in ("embed", "layers.1.wq", "norm"):
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], w[name].astype(dtype).astype(np.float32))


def test_chat_template_from_any_file(tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    for kind in ("jinja", "json", "tokenizer_config"):
        folder = write_tiny_hf(tmp_path / kind)
        if kind == "jinja":
            (tmp_path / kind / "chat_template.jinja").write_text(template)
        elif kind == "json":
            (tmp_path / kind / "chat_template.json").write_text(
                json.dumps({"chat_template": template}))
        else:
            (tmp_path / kind / "tokenizer_config.json").write_text(
                json.dumps({"chat_template": template, "add_bos_token": False}))
        assert load_model(folder)[2]["chat_template"] == template, kind


def test_generation_stops_at_every_eos_id(tmp_path):
    """generation_config may list several EOS ids; generation ends at the first of any."""
    # Untied: with the tied random embedding the tiny model only repeats its last token.
    config = hf_config(tie_word_embeddings=False)
    w = random_weights(dataclasses.replace(TINY, tie_embeddings=False), seed=3)
    folder = write_tiny_hf(tmp_path / "m", config, hf_tensors(w))
    art = load_artifact(compile_model(CompileOptions(model=folder, max_context=64),
                                      str(tmp_path / "a"), quiet=True))
    prompt = [40, 41, 42]
    free = generate(art, prompt, max_new_tokens=12, stop_at_eos=False).ids
    # The first token that is new in the output: the run must end just after it.
    k = next(k for k in range(1, len(free)) if free[k] not in free[:k])
    stop = free[k]
    assert 2 not in free[: k + 1]
    write_tiny_hf(tmp_path / "m", config, hf_tensors(w),
                  generation={"eos_token_id": [2, stop], "bos_token_id": 1})
    art = load_artifact(compile_model(CompileOptions(model=folder, max_context=64),
                                      str(tmp_path / "b"), quiet=True))
    assert art.tokenizer.eos_token_ids == [2, stop] and art.tokenizer.eos_token_id == 2
    assert generate(art, prompt, max_new_tokens=12).ids == free[: k + 1]


def test_old_manifest_single_eos_id():
    tok = build_tokenizer(byte_tokenizer_spec(TINY.vocab_size)).to_str()
    info = TokenizerInfo.from_files(tok, {"eos_token_id": 2, "bos_token_id": 1})
    assert info.eos_token_ids == [2] and info.eos_token_id == 2
    assert TokenizerInfo.from_files(tok, {}).eos_token_ids == []


# --- GGUF metadata that changes the model ---------------------------------------------------


@pytest.mark.parametrize("case, needle", [
    ("yarn", "rope.scaling.type"),
    ("linear", "rope.scaling.type"),
    ("factor", "rope.scaling.factor"),
    ("rope_freqs", "rope_freqs"),
    ("unknown_key", "llama.attention.sliding_window"),
])
def test_gguf_refuses_unsupported_metadata(tmp_path, case, needle):
    import gguf

    def edit(wr):
        if case in ("yarn", "linear"):
            wr.add_rope_scaling_type(getattr(gguf.RopeScalingType, case.upper()))
            wr.add_rope_scaling_factor(4.0)
        elif case == "factor":
            wr.add_rope_scaling_factor(2.0)
        elif case == "rope_freqs":  # how llama.cpp stores Llama 3.1's RoPE scaling
            wr.add_tensor("rope_freqs.weight", np.ones(TINY.head_dim // 2, np.float32))
        else:
            wr.add_uint32("llama.attention.sliding_window", 64)

    path = tmp_path / "m.gguf"
    write_gguf(path, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size), edit=edit)
    with pytest.raises(HetcompError, match=needle):
        load_model(str(path))


@pytest.mark.parametrize("case, needle", [
    # llama.cpp adds a llama's optional q/k/v biases; dropped, the model would differ.
    ("bias", "unsupported GGUF tensor blk.0.attn_k.bias"),
    ("vocab", "token_embd.weight has shape [%d, %d], its metadata implies [%d, %d]" % (
        TINY.vocab_size, TINY.hidden_size, TINY.vocab_size - 20, TINY.hidden_size)),
    ("ffn", "blk.0.ffn_gate.weight has shape"),
])
def test_gguf_tensors_must_be_the_ones_the_metadata_implies(tmp_path, case, needle, cli):
    """Every tensor in the file is read, with the shape its metadata implies: else one line
    before any work (a wrong size used to fail after the whole build, as an assertion)."""
    def edit(wr):
        if case == "bias":
            for i in range(TINY.num_layers):
                for x, n in (("q", TINY.num_heads), ("k", TINY.num_kv_heads),
                             ("v", TINY.num_kv_heads)):
                    wr.add_tensor(f"blk.{i}.attn_{x}.bias",
                                  np.ones(n * TINY.head_dim, np.float32))
        elif case == "vocab":
            wr.add_vocab_size(TINY.vocab_size - 20)
        else:
            wr.add_feed_forward_length(TINY.intermediate_size * 2)

    path = tmp_path / "m.gguf"
    write_gguf(path, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size), edit=edit)
    rc, _, err = cli("compile", "--model", path, "--max-context", 64, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out").exists()


def test_gguf_plain_scaling_none_is_accepted(tmp_path):
    import gguf

    def edit(wr):
        wr.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        wr.add_rope_dimension_count(TINY.head_dim)

    path = tmp_path / "m.gguf"
    write_gguf(path, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size), edit=edit)
    assert load_model(str(path))[0].rope_theta == TINY.rope_theta


# --- Bad folders through the CLI: one line, exit 2, nothing written -------------------------


def _break(folder, case):
    w = hf_tensors(random_weights(TINY, seed=3))
    if case == "no_config":
        write_tiny_hf(folder)
        os.remove(os.path.join(folder, "config.json"))
    elif case == "missing_shard":
        write_tiny_hf(folder, shards=3)
        os.remove(os.path.join(folder, "model-00002-of-00003.safetensors"))
    elif case == "unlisted_shard":
        write_tiny_hf(folder, shards=2)
        save_file({"x": np.ones(2, np.float32)}, os.path.join(folder, "extra.safetensors"))
    elif case == "missing_tensor":
        write_tiny_hf(folder, shards=2)
        with open(os.path.join(folder, "model.safetensors.index.json")) as fh:
            index = json.load(fh)
        first = "model-00001-of-00002.safetensors"
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh)
    elif case == "truncated":
        write_tiny_hf(folder)
        path = os.path.join(folder, "model.safetensors")
        os.truncate(path, os.path.getsize(path) - 1000)
    elif case in ("int8", "f64"):
        name = "model.layers.1.mlp.down_proj.weight"
        w[name] = w[name].astype(np.int8 if case == "int8" else np.float64)
        write_tiny_hf(folder, tensors=w)
    elif case == "no_weight":
        del w["model.layers.1.self_attn.o_proj.weight"]
        write_tiny_hf(folder, tensors=w)
    elif case == "config_list":
        write_tiny_hf(folder, [1])
    elif case == "archs_int":
        write_tiny_hf(folder, hf_config(architectures=5))
    elif case == "rope_list":
        write_tiny_hf(folder, hf_config(rope_scaling=[1]))
    elif case == "index_list":
        write_tiny_hf(folder, shards=2)
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            json.dump([1], fh)
    elif case in ("generation_list", "eos_text", "eos_negative", "bos_list", "bos_outside"):
        write_tiny_hf(folder, generation={"generation_list": [1, 2],
                                          "eos_text": {"eos_token_id": "abc"},
                                          "eos_negative": {"eos_token_id": [2, -5]},
                                          "bos_list": {"bos_token_id": [1, 2]},
                                          "bos_outside": {"bos_token_id": 99999}}[case])
    elif case in ("tokenizer_config_list", "template_int"):
        write_tiny_hf(folder)
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
            json.dump([1] if case == "tokenizer_config_list" else {"chat_template": 5}, fh)
    elif case == "deep_json":
        write_tiny_hf(folder)
        with open(os.path.join(folder, "config.json"), "w") as fh:
            fh.write("[" * 100000 + "]" * 100000)
    elif case == "bad_tokenizer":
        write_tiny_hf(folder)
        with open(os.path.join(folder, "tokenizer.json"), "w") as fh:
            json.dump({"hello": 1}, fh)
    elif case == "template_syntax":
        write_tiny_hf(folder)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as fh:
            fh.write("{% for m in messages %}{{ m.content }")


@pytest.mark.parametrize("case, needle", [
    ("no_config", "no config.json"),
    ("missing_shard", "model-00002-of-00003.safetensors named by model.safetensors.index.json"),
    ("unlisted_shard", "extra.safetensors"),
    ("missing_tensor", "model.layers.9.mlp.up_proj.weight"),
    ("truncated", "truncated"),
    ("int8", "unsupported safetensors dtype I8"),
    ("f64", "unsupported safetensors dtype F64"),
    ("no_weight", "missing tensor model.layers.1.self_attn.o_proj.weight"),
    ("config_list", "config.json is not a JSON object"),
    ("archs_int", "architectures 5 is not a list of names"),
    ("rope_list", "unsupported rope_parameters [1]"),
    ("index_list", "model.safetensors.index.json is not a JSON object"),
    ("generation_list", "generation_config.json is not a JSON object"),
    ("tokenizer_config_list", "tokenizer_config.json is not a JSON object"),
    ("deep_json", "cannot read"),
    ("bad_tokenizer", "tokenizer.json"),
    ("eos_text", "eos_token_id is not a token id or a list of them: 'abc'"),
    ("eos_negative", "eos_token_id is not a token id"),
    ("bos_list", "bos_token_id is a list"),
    ("bos_outside", "token id 99999 in the folder's eos/bos ids lies outside the vocabulary"),
    ("template_syntax", "chat_template.jinja is not valid Jinja: unexpected '}'"),
    ("template_int", "is not a string"),
])
def test_bad_folders_are_assert_one_line_error(tmp_path, case, needle, cli):
    # `hetcomp compile` in-process (``cli``): a process start and TVM's import less per case.
    folder = tmp_path / "model"
    _break(str(folder), case)
    out = tmp_path / "out"
    rc, _, err = cli("compile", "--model", folder, "--max-context", 64, "-o", out)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hetcomp-tmp")]


def test_qwen2_folder_written_by_transformers(tmp_path):
    """A tiny Qwen2ForCausalLM as transformers builds and saves it (q/k/v biases, untied LM
    head): its logits and greedy ids are transformers' own."""
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=TINY.vocab_size, max_position_embeddings=128,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, rms_norm_eps=1e-6,
        tie_word_embeddings=False)).eval()
    with torch.no_grad():  # transformers initialises biases to 0: make them matter
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if name.endswith("bias") else 0.1)
    model.save_pretrained(tmp_path / "hf")
    with open(tmp_path / "hf" / "tokenizer.json", "w") as fh:
        fh.write(build_tokenizer(byte_tokenizer_spec(TINY.vocab_size)).to_str())
    cfg = load_model(str(tmp_path / "hf"))[0]
    assert cfg.qkv_bias and not cfg.tie_embeddings and cfg.rope_theta == 1e6
    art = load_artifact(compile_model(CompileOptions(model=str(tmp_path / "hf")),
                                      str(tmp_path / "art"), quiet=True))
    prompt = [5, 17, 99, 3, 42]
    sess = art.new_session()
    nxt, _ = sess.prefill(prompt)
    _, _, logits = sess.verify([nxt], [len(prompt)], np.ones((1, 1)))
    ids = prompt + [nxt]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0, -1].numpy()
        for _ in range(15):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert np.abs(logits.numpy()[0] - theirs).max() / np.abs(theirs).max() < 1e-4
    assert generate(art, prompt, 16, stop_at_eos=False).ids == ids[len(prompt):]
