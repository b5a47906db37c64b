"""Write tiny GGUF files the way llama.cpp's converter does: arch llama (Q/K rows permuted),
qwen2 (rows as HF has them, q/k/v biases) or gemma3 (rows as HF has them, q/k norms and
post-norms, key_length and sliding_window; the norm weights as given, i.e. already ``1 + w``
as the converter stores them)."""

import numpy as np


def permute_rope(w, n_head):
    """llama.cpp convert_hf_to_gguf's ``permute`` (HF rotate-half -> interleaved rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, cfg, w, spec, arch="llama", qtype="F32", edit=None):
    """Returns the weights as the file stores them (after quantization round trips).

    ``arch="qwen2"`` writes ``w``'s biases (``layers.{i}.b{q,k,v}``) and no Q/K permutation;
    an ``lm_head`` in ``w`` is written as ``output.weight`` (an untied LM head).
    ``edit(writer)`` may add metadata or tensors before the file is written."""
    import gguf

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(cfg.num_layers)
    wr.add_context_length(cfg.max_context)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_head_count(cfg.num_heads)
    wr.add_head_count_kv(cfg.num_kv_heads)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_layer_norm_rms_eps(cfg.norm_eps)
    wr.add_vocab_size(cfg.vocab_size)
    if arch == "gemma3":
        wr.add_key_length(cfg.head_dim)
        wr.add_value_length(cfg.head_dim)
        wr.add_sliding_window(cfg.sliding_window)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(spec["pre"])
    wr.add_token_list(spec["tokens"])
    wr.add_token_types(spec["token_type"])
    wr.add_token_merges(spec["merges"])
    wr.add_eos_token_id(spec["eos_token_id"])
    stored = {}

    def add(name, ours, arr, permute_heads=None):
        arr = arr.astype(np.float32)
        if permute_heads:
            arr = permute_rope(arr, permute_heads)
        if arr.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(arr, qt)
            back = gguf.quants.dequantize(data, qt).reshape(arr.shape)
            wr.add_tensor(name, data, raw_dtype=qt)
        else:
            back = arr
            wr.add_tensor(name, arr)
        if permute_heads:  # what the loader should recover: the un-permuted matrix
            n, k = back.shape
            back = back.reshape(permute_heads, n // permute_heads // 2, 2, k).swapaxes(1, 2)
            back = back.reshape(n, k)
        stored[ours] = np.ascontiguousarray(back, dtype=np.float32)

    add("token_embd.weight", "embed", w["embed"])
    add("output_norm.weight", "norm", w["norm"])
    if "lm_head" in w:
        add("output.weight", "lm_head", w["lm_head"])
    permuted = arch == "llama"  # llama.cpp's LlamaModel permutes; Qwen2Model does not
    for i in range(cfg.num_layers):
        p, q = f"blk.{i}.", f"layers.{i}."
        add(p + "attn_norm.weight", q + "attn_norm", w[q + "attn_norm"])
        add(p + "attn_q.weight", q + "wq", w[q + "wq"], permuted and cfg.num_heads)
        add(p + "attn_k.weight", q + "wk", w[q + "wk"], permuted and cfg.num_kv_heads)
        for x in "qkv" if arch == "qwen2" else "":
            add(p + f"attn_{x}.bias", q + "b" + x, w[q + "b" + x])
        add(p + "attn_v.weight", q + "wv", w[q + "wv"])
        add(p + "attn_output.weight", q + "wo", w[q + "wo"])
        add(p + "ffn_norm.weight", q + "ffn_norm", w[q + "ffn_norm"])
        add(p + "ffn_gate.weight", q + "w_gate", w[q + "w_gate"])
        add(p + "ffn_up.weight", q + "w_up", w[q + "w_up"])
        add(p + "ffn_down.weight", q + "w_down", w[q + "w_down"])
        if arch == "gemma3":
            for theirs, ours in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm"),
                                 ("post_attention_norm", "post_attn_norm"),
                                 ("post_ffw_norm", "post_ffn_norm")):
                if q + ours in w:  # (absent: a broken file, for the tests of refusals)
                    add(p + theirs + ".weight", q + ours, w[q + ours])
    if edit is not None:
        edit(wr)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return stored
