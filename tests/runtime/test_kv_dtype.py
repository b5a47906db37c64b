"""`compile --kv-dtype`: the cache's element type, recorded in the manifest, allocated by the
runtime, counted by inspect; a float16 cache decodes as the float32 one does."""

import numpy as np
import pytest

from hetcomp.artifact_format import kv_dtype
from hetcomp.cost.roofline import (
    ModelShape,
    attention_features,
    dense_attention_features,
    sparse_attention_features,
)
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.driver.inspect import deployment_memory
from hetcomp.errors import HetcompError
from hetcomp.runtime import generate, load_artifact
from hetcomp.testing import TINY

PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module")
def tiny_f16_cache(tmp_path_factory, tiny_loaded):
    out = tmp_path_factory.mktemp("kv16") / "art"
    compile_model(CompileOptions(model="tiny", kv_dtype="float16"), str(out), quiet=True,
                  weights=tiny_loaded)
    return load_artifact(str(out))


def test_default_is_the_weights_dtype():
    assert CompileOptions(dtype="float32").cache_dtype == "float32"
    assert CompileOptions(dtype="float16").cache_dtype == "float16"
    assert CompileOptions(dtype="float16", kv_dtype="float32").cache_dtype == "float32"
    with pytest.raises(HetcompError, match="--kv-dtype"):
        CompileOptions(kv_dtype="bfloat16")
    assert kv_dtype({}) == "float32"  # a manifest from before --kv-dtype


def test_roofline_counts_cache_bytes_in_the_kv_dtype():
    """The dense part and the fused kernel stream the cache: half its bytes in float16; the
    sparse part reads the tree's float32 K/V either way."""
    full, half = (ModelShape.from_config(TINY, "float32", kv) for kv in ("float32", "float16"))
    assert (full.kv_bytes, half.kv_bytes) == (4, 2)
    g, d, cache = TINY.num_kv_heads, TINY.head_dim, 100
    for feats in (dense_attention_features, attention_features):
        assert feats(full, 4, cache).bytes - feats(half, 4, cache).bytes == \
            2 * 2 * g * d * (cache + (4 if feats is attention_features else 0))
    assert sparse_attention_features(full, 4, 9).bytes == sparse_attention_features(
        half, 4, 9).bytes


def test_manifest_runtime_and_inspect_use_the_kv_dtype(tiny_f16_cache, tiny_reference):
    art = tiny_f16_cache
    assert art.manifest["kv_dtype"] == "float16" and tiny_reference.manifest["kv_dtype"] == \
        "float32"
    s = art.new_session()
    assert s.k_cache.dtype == s.v_cache.dtype == "float16"
    half, full = deployment_memory(art.manifest), deployment_memory(tiny_reference.manifest)
    assert 2 * half["kv_cache"] == full["kv_cache"] == 2 * 4 * TINY.num_layers * \
        TINY.num_kv_heads * TINY.head_dim * TINY.max_context


def test_float16_cache_decodes_as_float32(tiny_f16_cache, tiny_reference):
    """Same greedy tokens; logits of a tree verify (dense + sparse split) close to the float32
    cache's (float16 rounding of K/V only: everything is accumulated in float32)."""
    a, b = tiny_f16_cache.new_session(), tiny_reference.new_session()
    a.prefill(PROMPT)
    b.prefill(PROMPT)
    mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], "int32")
    pos = np.array([0, 1, 1, 2]) + len(PROMPT)
    la = a.verify([7, 8, 9, 10], pos, mask)[2].numpy()
    lb = b.verify([7, 8, 9, 10], pos, mask)[2].numpy()
    err = np.abs(la - lb).max() / np.abs(lb).max()
    assert 0 < err < 2e-3, err  # rounded (not bit-equal), and only by float16's precision
    assert (generate(tiny_f16_cache, PROMPT, 24, False).ids
            == generate(tiny_reference, PROMPT, 24, False).ids)


def test_float16_cache_tree_verify_equals_sequential(tiny_f16_cache):
    """The sparse part reads the tree's K/V rounded as the cache holds them, so a chain
    verified at once (dense + sparse split) gives the logits of sequential steps (the fused
    kernel, reading each node's K/V back from the cache) to float32 rounding; with unrounded
    tree K/V they differed by float16's precision. A branch commit (kv_commit on float16)
    then continues exactly."""
    seq = tiny_f16_cache.new_session()
    tok, _ = seq.prefill(PROMPT)
    chain, seq_logits = [tok], []
    for i in range(4):
        ids, _, logits = seq.verify([chain[-1]], [len(PROMPT) + i], np.ones((1, 1), "int32"))
        seq.commit([0])
        seq_logits.append(logits.numpy()[0])
        chain.append(int(ids[0]))
    tree = tiny_f16_cache.new_session()
    tree.prefill(PROMPT)
    ids, _, logits = tree.verify(chain[:4], np.arange(4) + len(PROMPT),
                                 np.tril(np.ones((4, 4), "int32")))
    ref = np.array(seq_logits)
    # Measured: 5e-7 (float32 reassociation); 1.9e-5 with the tree's K/V left unrounded.
    assert np.abs(logits.numpy() - ref).max() / np.abs(ref).max() < 4e-6
    assert ids.tolist() == chain[1:]
    # A branch: root, a wrong sibling, then the right second token; commit nodes 0 and 2.
    tree.truncate(len(PROMPT))
    branch = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], "int32")
    tree.verify([chain[0], (chain[1] + 1) % TINY.vocab_size, chain[1]],
                np.array([0, 1, 1]) + len(PROMPT), branch)
    tree.commit([0, 2])
    ids, _, logits = tree.verify([chain[2]], [len(PROMPT) + 2], np.ones((1, 1), "int32"))
    assert np.abs(logits.numpy()[0] - ref[2]).max() / np.abs(ref).max() < 4e-6
