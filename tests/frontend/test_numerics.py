"""Every compiled function against the independent numpy LLaMA (tiny random configs)."""

import numpy as np
import pytest

from hetcomp.frontend.config import LlamaConfig
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, compile_tiny, depths, full_mask, tree_mask
from hetcomp.testing import numpy_llama as ref

RTOL = 1e-4
SCALE = 0.3


@pytest.fixture(scope="module", params=["default", "device_len", "fused"])
def tiny_artifact(request, tmp_path_factory):
    """The tiny model as compiled for the CPU, as compiled for CUDA graphs (the cache length
    read on the device, every attention ``script_ops.tree_attention``, one cache pair per
    artifact) and as a GPU build's module is, its norms and activations inside the linears
    too (FuseLinearChains: verify_w1's and the prefill chunk's), each run on the CPU: the
    same checks hold for all three. The weights' scale makes greedy tokens vary (at the
    default a tiny model mostly repeats its input token)."""
    if request.param == "default":
        return compile_tiny(tmp_path_factory, scale=SCALE)
    fused = request.param == "fused"
    return compile_tiny(tmp_path_factory, name=request.param, device_len=True, scale=SCALE,
                        **({"fuse_linears": True} if fused else {}))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_prefill_matches_numpy(tiny_artifact):
    path, w = tiny_artifact
    art = load_artifact(path)
    prompt = [5, 17, 99, 3, 42, 7, 8, 300, 11]
    sess = art.new_session()
    nxt, hidden = sess.prefill(prompt)
    logits, ref_hidden = ref.forward(TINY, w, prompt)
    assert nxt == int(np.argmax(logits[-1]))
    assert rel_err(hidden.numpy()[0], ref_hidden[-1]) < RTOL
    assert sess.length == len(prompt)


def test_chunked_prefill_equals_one_shot(tiny_artifact):
    """The static padded chunk (37 of 64 rows) equals symbolic chunks of 8."""
    path, w = tiny_artifact
    art = load_artifact(path)
    assert art._prefill_static[0] == 64
    prompt = list(range(3, 40))
    na, ha = art.new_session().prefill(prompt)
    nb, hb = art.new_session().prefill(prompt, chunk=8)
    assert na == nb
    assert rel_err(ha.numpy(), hb.numpy()) < 1e-5  # summation order only


def test_short_prompt_pads_in_the_graph_build_only(tiny_artifact):
    """9 tokens: the CPU build runs them symbolic (padding to 64 rows would cost more); the
    fixed-cache build pads them into its static chunk (one CUDA graph on a GPU, which reads
    the weights once for 1 row or 64). Both match numpy (test_prefill_matches_numpy)."""
    path, w = tiny_artifact
    art = load_artifact(path)
    symbolic, calls = art._prefill, []
    art._prefill = lambda *args: calls.append(1) or symbolic(*args)
    art.new_session().prefill([5, 17, 99, 3, 42, 7, 8, 300, 11])
    assert calls == ([] if art.fixed_cache else [1])


def test_prefill_across_static_chunks_then_decode(tiny_artifact):
    """A 100-token prompt: one full static chunk, one padded (its padding's K/V sit past the
    prompt); prefill and the decode steps after it match numpy at every position."""
    path, w = tiny_artifact
    sess = load_artifact(path).new_session()
    prompt = list(np.random.default_rng(5).integers(0, TINY.vocab_size, 100))
    nxt, hidden = sess.prefill(prompt)
    logits, ref_hidden = ref.forward(TINY, w, prompt)
    assert nxt == int(np.argmax(logits[-1])) and sess.length == 100
    assert rel_err(hidden.numpy()[0], ref_hidden[-1]) < RTOL
    seq = [*prompt, nxt]
    for _ in range(3):  # decode over the slots the padding wrote
        ids, _, out = sess.verify([seq[-1]], [len(seq) - 1], np.ones((1, 1), "int32"))
        sess.commit([0])
        want, _ = ref.forward(TINY, w, seq)
        assert rel_err(out.numpy()[0], want[-1]) < RTOL
        seq.append(int(ids[0]))


@pytest.mark.parametrize("parents", [[-1], [-1, 0, 0, 1, 3, 2], [-1, 0, 1, 2, 0, 4, 0]])
def test_verify_tree_matches_numpy(tiny_artifact, parents):
    path, w = tiny_artifact
    art = load_artifact(path)
    prompt = [5, 17, 99, 3, 42]
    sess = art.new_session()
    sess.prefill(prompt)
    toks = np.arange(10, 10 + len(parents))
    mask = tree_mask(parents)
    pos = depths(parents) + len(prompt)
    ids, hidden, logits = sess.verify(toks, pos, mask)
    ref_logits, ref_hidden = ref.forward(
        TINY, w, np.concatenate([prompt, toks]),
        positions=np.concatenate([np.arange(len(prompt)), pos]),
        mask=full_mask(len(prompt), mask))
    t = len(prompt)
    assert rel_err(logits.numpy(), ref_logits[t:]) < RTOL
    assert rel_err(hidden.numpy(), ref_hidden[t:]) < RTOL
    np.testing.assert_array_equal(ids, ref_logits[t:].argmax(-1))


def test_commit_non_trivial_path(tiny_artifact):
    """Commit a branch that skips nodes; later steps must see exactly that path."""
    path, w = tiny_artifact
    art = load_artifact(path)
    prompt = [9, 8, 7, 6]
    parents = [-1, 0, 0, 2, 1, 3]  # accepted path 0 -> 2 -> 3 -> 5
    toks = np.array([40, 41, 42, 43, 44, 45])
    sess = art.new_session()
    sess.prefill(prompt)
    sess.verify(toks, depths(parents) + len(prompt), tree_mask(parents))
    sess.commit([0, 2, 3, 5])
    assert sess.length == len(prompt) + 4
    ids, _, logits = sess.verify([77], [sess.length], np.ones((1, 1)))
    seq = prompt + [40, 42, 43, 45, 77]
    ref_logits, _ = ref.forward(TINY, w, seq)
    assert rel_err(logits.numpy()[0], ref_logits[-1]) < RTOL


def test_sequential_generation_matches_numpy_greedy(tiny_artifact):
    from hetcomp.runtime import generate

    path, w = tiny_artifact
    art = load_artifact(path)
    prompt = [12, 200, 31, 4]
    res = generate(art, prompt, max_new_tokens=12, stop_at_eos=False)
    want = ref.greedy(TINY, w, prompt, 12)
    assert len(set(want)) > 3 and res.ids == want
    assert res.steps == 11 and res.accepted_per_step == 1.0


@pytest.mark.parametrize("cfg", [
    LlamaConfig(hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6,
                num_kv_heads=1, vocab_size=272, max_context=64, rope_theta=500000.0,
                tie_embeddings=False),
    LlamaConfig(hidden_size=48, intermediate_size=64, num_layers=1, num_heads=3,
                num_kv_heads=3, vocab_size=260, max_context=32, norm_eps=1e-6),
    # A context no 2 divides: one-key attention tiles (`--max-context 31` did not compile).
    LlamaConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, vocab_size=320, max_context=31),
], ids=["mqa-untied", "mha-odd-sizes", "odd-context"])
def test_other_configs(tmp_path_factory, cfg):
    path, w = compile_tiny(tmp_path_factory, cfg, seed=3, name="cfg")
    art = load_artifact(path)
    prompt = [7, 100, 250, 3, 9, 10]
    sess = art.new_session()
    sess.prefill(prompt[:-2])
    parents = [-1, 0, 1]
    toks = np.array(prompt[-2:] + [1])
    ids, hidden, logits = sess.verify(toks, depths(parents) + 4, tree_mask(parents))
    ref_logits, _ = ref.forward(cfg, w, prompt + [1])
    assert rel_err(logits.numpy(), ref_logits[4:]) < RTOL


def test_float16_weights(tmp_path_factory):
    path, w = compile_tiny(tmp_path_factory, TINY, dtype="float16", seed=1, name="fp16")
    art = load_artifact(path)
    w16 = {k: v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v for k, v in w.items()}
    prompt = [1, 2, 3, 50, 60]
    _, hidden = art.new_session().prefill(prompt)
    _, ref_hidden = ref.forward(TINY, w16, prompt)
    assert rel_err(hidden.numpy()[0], ref_hidden[-1]) < RTOL


@pytest.fixture(scope="module")
def wide_artifact(tmp_path_factory):
    """TINY with width-specialised verify functions: W = 2 on the fused attention kernel,
    W = 4 and 16 on dense part + sparse CSR kernel + merge (``FUSED_WIDTHS``)."""
    from hetcomp.driver.compile import CompileOptions, compile_model
    from hetcomp.frontend.weights import random_weights
    from hetcomp.testing import byte_tokenizer_spec

    w = random_weights(TINY, seed=5)
    out = tmp_path_factory.mktemp("wide") / "art"
    compile_model(CompileOptions(model="tiny.gguf", verify_widths=(2, 4, 16),
                                 max_context=TINY.max_context), str(out), quiet=True,
                  weights=(TINY, w, byte_tokenizer_spec(TINY.vocab_size), __file__))
    return str(out), w


@pytest.mark.parametrize("parents", [
    [-1, 0],  # verify_w2, fused
    [-1, 0, 0, 1],  # verify_w4, split
    [-1, 0, 1, 2],  # a chain (every row holds all earlier nodes)
    [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 3, 10, 0, 12, 13, 5],  # verify_w16, split, depth 5
    [-1, 0, 0, 1, 1],  # the generic verify (no verify_w5), split
])
@pytest.mark.parametrize("cache", [1, 37])
def test_verify_sparse_path_matches_numpy(wide_artifact, parents, cache):
    path, w = wide_artifact
    art = load_artifact(path)
    assert art.static_widths == [1, 2, 4, 16]
    prompt = [int(t) for t in (np.arange(cache) * 7 + 3) % TINY.vocab_size]
    sess = art.new_session()
    sess.prefill(prompt)
    toks = (np.arange(len(parents)) * 13 + 40) % TINY.vocab_size
    mask = tree_mask(parents)
    pos = depths(parents) + cache
    ids, hidden, logits = sess.verify(toks, pos, mask)
    ref_logits, ref_hidden = ref.forward(
        TINY, w, np.concatenate([prompt, toks]),
        positions=np.concatenate([np.arange(cache), pos]), mask=full_mask(cache, mask))
    assert rel_err(logits.numpy(), ref_logits[cache:]) < RTOL
    assert rel_err(hidden.numpy(), ref_hidden[cache:]) < RTOL
    np.testing.assert_array_equal(ids, ref_logits[cache:].argmax(-1))


def test_fixed_cache_artifact_holds_one_cache(tiny_artifact):
    """An artifact built for CUDA graphs (manifest ``fixed_cache``) hands its one cache pair
    to each new session; the older session is refused in one line, the newer one runs from
    an empty cache: the stale K/V past its length (the older session's 100 tokens) are
    never read. Other builds give each session its own cache: one's writes leave the
    other's intact."""
    from hetcomp.errors import HetcompError

    path, w = tiny_artifact
    art = load_artifact(path)
    first = art.new_session()
    long_prompt = list(np.random.default_rng(6).integers(1, TINY.vocab_size, 100))
    first.prefill(long_prompt)
    second = art.new_session()
    assert art.fixed_cache == ("/tiny" not in path)  # the CPU build: compile_tiny("tiny")
    prompt = [12, 200, 31, 4]
    if not art.fixed_cache:
        second.prefill(prompt)
        _, hidden = first.prefill([4])  # separate caches: both sessions live
        _, ref_hidden = ref.forward(TINY, w, long_prompt + [4])
        assert rel_err(hidden.numpy()[0], ref_hidden[-1]) < RTOL
        return
    with pytest.raises(HetcompError, match="newer session"):
        first.prefill([4])
    nxt, hidden = second.prefill(prompt)
    logits, ref_hidden = ref.forward(TINY, w, prompt)
    assert nxt == int(np.argmax(logits[-1]))
    assert rel_err(hidden.numpy()[0], ref_hidden[-1]) < RTOL
    parents = [-1, 0, 0, 1]
    toks, pos, mask = np.arange(10, 14), depths(parents) + len(prompt), tree_mask(parents)
    _, hidden, logits = second.verify(toks, pos, mask)
    ref_logits, _ = ref.forward(TINY, w, np.concatenate([prompt, toks]),
                                positions=np.concatenate([np.arange(len(prompt)), pos]),
                                mask=full_mask(len(prompt), mask))
    assert rel_err(logits.numpy(), ref_logits[len(prompt):]) < RTOL


def test_verify_refuses_a_root_away_from_the_cache_end(tiny_artifact):
    """Every build may read the cache length from ``positions[0]`` (the CUDA-graph build
    does): a tree whose root is not at the cache's end is refused, not computed wrong."""
    from hetcomp.errors import HetcompError

    sess = load_artifact(tiny_artifact[0]).new_session()
    sess.prefill([5, 17, 99])
    with pytest.raises(HetcompError, match="not at the cache length 3"):
        sess.verify([1, 2], [4, 5], tree_mask([-1, 0]))
    sess.verify([1, 2], [3, 4], tree_mask([-1, 0]))
