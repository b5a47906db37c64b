"""Speculative decoding is lossless: token-identical to sequential greedy decoding."""

import dataclasses
import os
import warnings

import numpy as np
import pytest

from hetcomp.driver.calibrate import (
    CalibrateOptions,
    calibrate,
    calibrate_model,
    load_cache,
    make_targets,
)
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.errors import HetcompError
from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import generate, load_artifact
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.testing import TINY, byte_tokenizer_spec
from hetcomp.testing.gguf_writer import write_gguf

WIDTHS = (2, 4, 8, 16)


def test_make_targets():
    feats = [np.zeros((5, 2))]
    seqs = [np.array([10, 11, 12, 13, 14])]
    _, roots, t = make_targets(feats, seqs, 2)
    np.testing.assert_array_equal(roots, [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(t, [[11, 12], [12, 13], [13, 14], [14, -1], [-1, -1]])


@pytest.fixture(scope="module")
def tiny_speculative(tmp_path_factory):
    """A tiny random model with Medusa heads calibrated on its own greedy outputs."""
    tmp = tmp_path_factory.mktemp("spec")
    w = random_weights(TINY, seed=11)
    loaded = (TINY, w, byte_tokenizer_spec(TINY.vocab_size), __file__)
    compile_model(CompileOptions(model="tiny", verify_widths=(16,)), str(tmp / "base"),
                  quiet=True, weights=loaded)
    assert load_artifact(str(tmp / "base")).static_widths == [1, 16]  # no heads, one extra
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(f"prompt {i} {'xyz'[i % 3] * (i % 5)}" for i in range(24)))
    opts = CalibrateOptions(corpus=str(corpus), num_heads=3, new_tokens=40, epochs=6,
                            held_out=0.25)
    heads = calibrate(load_artifact(str(tmp / "base")), w["embed"],
                      dataclasses.replace(opts, cache=str(tmp / "data.npz")), progress=False)
    # Re-training on the saved data (`calibrate --reuse`) gives the same heads, no model run.
    again = calibrate(None, w["embed"], opts, progress=False,
                      data=load_cache(str(tmp / "data.npz")))
    for field in ("w", "b", "u", "ranks", "vocab"):
        np.testing.assert_array_equal(getattr(again, field), getattr(heads, field))
    assert heads.info["lr_schedule"] == "cosine"
    heads.save(str(tmp / "heads.npz"))
    loaded_heads = MedusaHeads.load(str(tmp / "heads.npz"))
    assert loaded_heads.num_heads == 3 and loaded_heads.u is not None
    assert loaded_heads.ranks is not None
    compile_model(CompileOptions(model="tiny", heads=str(tmp / "heads.npz"), widths=WIDTHS),
                  str(tmp / "spec"), quiet=True, weights=loaded)
    return load_artifact(str(tmp / "spec"))


def test_calibrate_writes_heads_and_plot_into_place(tiny_speculative, tmp_path):
    """`hetcomp calibrate --reuse` end to end (the fixture's saved data, the same tiny model
    as a GGUF): the heads and their statistics plot beside them, each renamed into place;
    with --force a second run replaces both."""
    data = os.path.join(os.path.dirname(tiny_speculative.path), "data.npz")
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, TINY, random_weights(TINY, seed=11), byte_tokenizer_spec(TINY.vocab_size))
    out = tmp_path / "out" / "heads"
    opts = CalibrateOptions(corpus="unused", num_heads=3, new_tokens=40, epochs=1,
                            held_out=0.25)
    plots = []
    for force, heads in ((False, 3), (True, 2)):
        summary = calibrate_model(str(gguf), dataclasses.replace(opts, num_heads=heads),
                                  str(out), reuse=data, force=force)
        assert summary["heads"] == f"{out}.npz" and summary["plot"] == f"{out}.png"
        assert MedusaHeads.load(summary["heads"]).num_heads == heads
        with open(summary["plot"], "rb") as fh:
            plots.append(fh.read())
        assert plots[-1][:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(os.listdir(out.parent)) == ["heads.npz", "heads.png"]
        if not force:  # without --force the heads already there are refused, before any work
            with pytest.raises(HetcompError, match="--force"):
                calibrate_model(str(gguf), opts, str(out), reuse=data)
    assert plots[0] != plots[1]  # the plot of two heads replaced that of three


def test_tiny_speculation_is_lossless(tiny_speculative):
    art = tiny_speculative
    assert art.widths == list(WIDTHS)
    accepted = []
    for prompt in ([5, 17, 99], [200, 3, 4, 5, 6], [42]):
        seq = generate(art, prompt, max_new_tokens=40, stop_at_eos=False).ids
        for w in WIDTHS:
            res = generate(art, prompt, max_new_tokens=40, stop_at_eos=False, width=w)
            assert res.ids == seq, (prompt, w)
            accepted.append(res.accepted_per_step)
    # Trees do get accepted beyond the root, so the acceptance walk and commit are exercised.
    assert max(accepted) > 1.5


def test_every_width_decodes_to_the_end_of_the_context(tiny_speculative):
    """The cache holds the prompt and every new token but the last: a request that fits
    sequential decoding fits every width, the last steps verifying the tree that fits the
    room left, with the tokens of the independent numpy model; one token more is refused at
    every width, in one line that says what fits. (A step used to need the whole width free,
    so wider trees refused prompts W = 1 decodes.)"""
    from hetcomp.testing import numpy_llama

    art, ctx = tiny_speculative, tiny_speculative.config.max_context
    rng = np.random.default_rng(4)
    prompt = [5, 17, 99, 42, 7] * 12 + [int(t) for t in rng.integers(3, 300, ctx - 90)]
    new = ctx - len(prompt) + 1  # fills the cache exactly
    expected = numpy_llama.greedy(TINY, random_weights(TINY, seed=11), prompt, new)
    for w in (1, *WIDTHS):
        for lookup in {0, w - 1}:
            res = generate(art, prompt, max_new_tokens=new, stop_at_eos=False, width=w,
                           lookup=lookup)
            assert res.ids == expected, (w, lookup)
        with pytest.raises(HetcompError, match=f"plus --max-new-tokens \\({new + 1}\\) does "
                                               f"not fit the context of {ctx}"):
            generate(art, prompt, max_new_tokens=new + 1, width=w)
    # A prompt that fills the cache alone still gives its one token.
    assert generate(art, prompt + expected[:new - 1], max_new_tokens=1).ids == expected[-1:]


def test_medusa_logits_match_numpy(tiny_speculative):
    art = tiny_speculative
    sess = art.new_session()
    _, hidden = sess.prefill([1, 2, 3])
    root = 17
    cands = art.medusa_candidates(hidden, root, 5)
    from hetcomp import _tvm

    logits = art._medusa(hidden, _tvm.tensor(np.array([[0], [root]], "int32")),
                         *art.medusa_params)[0].numpy()
    assert art.manifest["functions"]["medusa"][2:] == ["medusa.w", "medusa.b", "medusa.u"]
    # The reference reads the heads file and the model's embedding, not the artifact's
    # parameters: heads stored swapped, reordered or transposed would fail here.
    heads = MedusaHeads.load(os.path.join(os.path.dirname(art.path), "heads.npz"))
    embed = random_weights(TINY, seed=11)["embed"].astype(np.float64)
    expected = heads.hidden(hidden.numpy().astype(np.float64), embed[[root]]) @ embed.T
    np.testing.assert_allclose(logits, expected[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cands, np.argsort(-logits, axis=1)[:, :5])
    assert np.abs(heads.u).max() > 0  # the root embedding really is used


def test_draft_reads_its_row_and_writes_the_tree_on_the_device(tiny_speculative):
    """The draft takes a verify call's hidden rows with the row to read (no copy through the
    host) and writes the next tree's tokens: ids where the node list gives one, head k's
    rank-r candidate where it says ``-1 - (10 k + r)``."""
    from hetcomp import _tvm
    from hetcomp.testing import depths, tree_mask

    art = tiny_speculative
    sess = art.new_session()
    sess.prefill([1, 2, 3])
    parents = [-1, 0, 0, 1]
    _, hid, _ = sess.verify(np.array([4, 5, 6, 7]), depths(parents) + 3, tree_mask(parents))
    rows = hid.numpy()
    assert np.abs(rows[0] - rows[3]).max() > 1e-3  # the rows differ: the row matters
    for row in (0, 2, 3):
        want = art.medusa_candidates(_tvm.tensor(rows[row: row + 1]), 17, 10)
        np.testing.assert_array_equal(art.medusa_candidates(hid, 17, 10, row=row), want)
        nodes = np.array([17, -1, -1 - 13, 99, -1 - 29, -1 - 20], "int32")
        tokens = art.draft_tree(hid, row, nodes).numpy()
        np.testing.assert_array_equal(
            tokens, [17, want[0, 0], want[1, 3], 99, want[2, 9], want[2, 0]])


def test_a_speculative_step_reads_back_only_its_result(tiny_speculative, monkeypatch):
    """Between the draft and verify nothing comes back to the host: a step reads verify's
    greedy ids and the tree's tokens (both after the step), never the candidates or the
    hidden states."""
    import tvm

    from hetcomp import _tvm

    reads = []
    real_numpy, real_download = tvm.runtime.Tensor.numpy, _tvm.download

    def counted(self, *args, **kwargs):
        reads.append(tuple(self.shape))
        return real_numpy(self, *args, **kwargs)

    def counted_download(tensor):
        reads.append(tuple(tensor.shape))
        return real_download(tensor)

    # Both ways back to the host are counted (the runtime reads with _tvm.download).
    monkeypatch.setattr(tvm.runtime.Tensor, "numpy", counted)
    monkeypatch.setattr(_tvm, "download", counted_download)
    res = generate(tiny_speculative, [5, 17, 99], max_new_tokens=24, stop_at_eos=False,
                   width=8)
    prefill_reads = 1  # prefill's greedy id
    assert len(reads) == prefill_reads + 2 * res.steps, reads
    assert all(shape == (8,) for shape in reads[prefill_reads:]), reads


def test_host_split_times_the_parts_of_a_step_and_restores_the_artifact(tiny_speculative,
                                                                       monkeypatch):
    """``unit_time.host_split``: per width, the step's time in VM calls, in reading results
    back (one read a sequential step; greedy ids and tree tokens a speculative one whose tree
    has Medusa nodes: here 4 of 8 nodes are looked up, the tiny model's replay would look up
    7) and on the host; the artifact's functions and the runtime's read-back are left as they
    were."""
    from hetcomp import _tvm
    from hetcomp.runtime.unit_time import host_split

    art = tiny_speculative
    monkeypatch.setitem(art.manifest, "lookup", {"8": 4})
    before = (art._verify, art._commit, art._medusa, dict(art._verify_static), _tvm.download)
    rows = host_split(art, [5, 17, 99], (1, 8), new_tokens=20)
    assert [r["width"] for r in rows] == [1, 8]
    assert [r["reads_per_step"] for r in rows] == [1.0, 2.0]
    for r in rows:
        assert r["vm_ms"] > 0 and r["wait_ms"] > 0 and r["host_ms"] > 0
        assert r["vm_ms"] < r["step_ms"]
    assert rows[1]["accepted_per_step"] > 1  # speculation ran
    after = (art._verify, art._commit, art._medusa, dict(art._verify_static), _tvm.download)
    assert after == before


def test_host_replay_times_the_host_alone(tiny_speculative, monkeypatch):
    """``unit_time.host_replay``: one real decode per prompt records what the host reads, then
    the timed rounds answer every compiled call from the record: the compiled functions run
    exactly as often as one decode runs them, the replay reproduces that decode's tokens (or
    fails), and the artifact's functions are left as they were."""
    from hetcomp.runtime.unit_time import host_replay

    art = tiny_speculative
    monkeypatch.setitem(art.manifest, "lookup", {"8": 4})  # what host_replay drafts at W = 8
    calls = {"verify": 0, "medusa": 0, "commit": 0}

    def counted(fn, key):
        def call(*args):
            calls[key] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(art, "_verify_static",
                        {w: counted(f, "verify") for w, f in art._verify_static.items()})
    monkeypatch.setattr(art, "_verify", counted(art._verify, "verify"))
    monkeypatch.setattr(art, "_medusa", counted(art._medusa, "medusa"))
    monkeypatch.setattr(art, "_commit", counted(art._commit, "commit"))
    before = (art._verify, art._commit, art._medusa, dict(art._verify_static))
    prompts = [[5, 17, 99], [7, 7, 7, 8]]
    real = [generate(art, p, 20, stop_at_eos=False, width=8, lookup=4) for p in prompts]
    one_decode = dict(calls)
    assert one_decode["verify"] == sum(r.steps for r in real) and one_decode["medusa"] > 0
    row = host_replay(art, prompts, 8, new_tokens=20, rounds=3)
    assert calls == {k: 2 * v for k, v in one_decode.items()}  # the record pass only
    assert row["width"] == 8 and row["steps"] == one_decode["verify"]
    assert row["host_us"] > 0
    assert (art._verify, art._commit, art._medusa, dict(art._verify_static)) == before


def test_step_shape_is_the_combined_tree(tiny_speculative):
    """A step's verified tree (``generate._step_shape``): the best Medusa tree of the width
    the lookup leaves, then the lookup nodes under the root or under each other; its mask,
    depths and CSR rows are the combined tree's own (``Tree.mask``, ``Tree.depths``,
    ``Tree.csr``), built anew or taken from the cache, and the draft's node references
    name each Medusa node's head and rank."""
    import importlib

    from hetcomp.artifact_format import MEDUSA_TOPK

    gen = importlib.import_module("hetcomp.runtime.generate")
    art = tiny_speculative
    rng = np.random.default_rng(3)
    for width in (1, 4, 8, 16):
        for _ in range(6):
            extra = int(rng.integers(0, width))
            looked = tuple(int(rng.integers(-1, i)) for i in range(extra))
            for _ in range(2):  # built, then cached
                shape = gen._step_shape(art, width, looked)
                tree = shape.tree
                base = art.tree(width - extra) if width > 1 else None
                medusa = base.width if base else 1
                assert tree.width == width and shape.medusa_nodes == medusa - 1
                assert tree.parents[:medusa] == (base.parents if base else (-1,))
                assert tree.parents[medusa:] == tuple(0 if p < 0 else medusa + p
                                                      for p in looked)
                np.testing.assert_array_equal(shape.mask, tree.mask())
                np.testing.assert_array_equal(shape.depths, tree.depths)
                for got, want in zip(shape.csr, tree.csr()):
                    np.testing.assert_array_equal(got, want)
                if base:
                    refs = -1 - np.asarray(shape.node_refs)
                    assert list(refs // MEDUSA_TOPK) == list(base.heads[1:])
                    assert list(refs % MEDUSA_TOPK) == list(base.ranks[1:])


def test_width_not_compiled_is_refused(tiny_artifact, tiny_speculative):
    """A width the artifact has no tree for is refused, saying what it has (compile has no
    --widths flag to advise)."""
    art = load_artifact(tiny_artifact[0])
    with pytest.raises(HetcompError, match="width 4 .* no Medusa heads: compile with --heads"):
        generate(art, [1, 2], max_new_tokens=4, width=4)
    with pytest.raises(HetcompError, match="width 17 .* trees have at most 16 nodes"):
        generate(tiny_speculative, [1, 2], max_new_tokens=4, width=17)


def test_float16_draft_head(tiny_speculative, tmp_path):
    """``draft_dtype="float16"``: the draft gets its own float16 copy of the LM head (rebuilt
    from the model's weight by its recipe) and float16 heads, its logits are those of the
    rounded weights, and speculation stays lossless (drafts only propose)."""
    import os

    heads = os.path.join(os.path.dirname(tiny_speculative.path), "heads.npz")
    loaded = (TINY, random_weights(TINY, seed=11), byte_tokenizer_spec(TINY.vocab_size),
              __file__)
    compile_model(CompileOptions(model="tiny", heads=heads, widths=WIDTHS,
                                 draft_dtype="float16"), str(tmp_path / "a"), quiet=True,
                  weights=loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert art.manifest["param_recipes"]["medusa.lm_head"] == {"weight": "embed",
                                                                "dtype": "float16"}
    assert art.manifest["functions"]["medusa"][:2] == ["embed", "medusa.lm_head"]
    head = art.medusa_params[1].numpy()
    assert head.dtype == np.float16
    np.testing.assert_array_equal(head, tiny_speculative.medusa_params[0].numpy()
                                  .astype(np.float16))
    names = art.manifest["functions"]["medusa"]
    for name, p16, p32 in zip(names[2:], art.medusa_params[2:],
                              tiny_speculative.medusa_params[2:]):
        want = np.float32 if name.endswith(".b") else np.float16  # biases stay float32
        assert p16.numpy().dtype == want, name
        np.testing.assert_array_equal(p16.numpy(), p32.numpy().astype(want))
    from hetcomp import _tvm

    sess = art.new_session()
    _, hidden = sess.prefill([1, 2, 3])
    root = _tvm.tensor(np.array([[0], [17]], "int32"))  # row 0 of `hidden`, root token 17
    l16 = art._medusa(hidden, root, *art.medusa_params)[0].numpy()
    l32 = tiny_speculative._medusa(hidden, root, *tiny_speculative.medusa_params)[0].numpy()
    assert 0 < np.abs(l16 - l32).max() < 1e-2 * np.abs(l32).max()  # rounded, not different
    for prompt in ([5, 17, 99], [42]):
        seq = generate(art, prompt, max_new_tokens=30, stop_at_eos=False).ids
        for w in WIDTHS:
            assert generate(art, prompt, max_new_tokens=30, stop_at_eos=False,
                            width=w).ids == seq


def test_draft_vocabulary_ranks_own_outputs_then_ids():
    from hetcomp.speculative.medusa import draft_vocabulary

    seqs = [np.array([7, 7, 7, 3, 9]), np.array([9, 9, 3, 3, 3, 3])]
    # counts: 3 x5, 9 x3, 7 x3 -> 3, 7, 9 (a tie goes to the lower id), then ids 0, 1, ...
    np.testing.assert_array_equal(draft_vocabulary(seqs, 12, 5), [0, 1, 3, 7, 9])
    np.testing.assert_array_equal(draft_vocabulary(seqs, 12, 2), [3, 7])
    with pytest.raises(HetcompError, match="draft vocabulary"):
        draft_vocabulary(seqs, 12, 13)


def test_soft_target_gradient_matches_finite_differences():
    """The mixed target ``soft * teacher + (1 - soft) * one_hot``: the gradient is that of the
    cross-entropy against it (checked numerically in float64)."""
    from hetcomp.speculative.medusa import _log_softmax_grad, _softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7))
    target = np.array([1, 4, 6])
    teacher = _softmax(rng.normal(size=(3, 7)))

    def loss(z):
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        mix = 0.3 * teacher + 0.7 * np.eye(7)[target]
        return -(mix * logp).sum(-1).mean()

    _, g = _log_softmax_grad(logits.copy(), target, teacher, 0.3)
    num = np.zeros_like(logits)
    for i in np.ndindex(*logits.shape):
        d = np.zeros_like(logits)
        d[i] = 1e-6
        num[i] = (loss(logits + d) - loss(logits - d)) / 2e-6
    np.testing.assert_allclose(g, num, atol=1e-8)
    _, g_hard = _log_softmax_grad(logits.copy(), target)
    assert np.abs(g - g_hard).max() > 1e-3  # the teacher really enters


def test_heads_over_a_draft_vocabulary_train_and_rank_real_ids():
    """Training over a draft vocabulary skips targets outside it; held-out ranks compare the
    real ids the vocabulary maps back to."""
    from hetcomp.speculative.medusa import TOPK, heldout_ranks, train_heads

    rng = np.random.default_rng(1)
    e, v = 16, 40
    embed = rng.normal(size=(v, e)).astype(np.float32)
    h = rng.normal(size=(64, e)).astype(np.float32)
    targets = np.stack([np.argmax(h @ embed.T, 1)] * 2, 1)  # learnable: the base head's choice
    vocab = np.arange(0, v, 2, dtype=np.int32)  # even ids only
    w, b, _ = train_heads(h, targets, embed, 2, epochs=2, progress=False, vocab=vocab)
    heads = MedusaHeads(w, b, np.zeros((2, TOPK)), {}, vocab=vocab)
    ranks = heldout_ranks(heads, h, targets, embed)
    odd = targets[:, 0] % 2 == 1
    assert odd.any() and (ranks[odd] == TOPK).all()  # outside the vocabulary: never proposed
    assert (ranks[~odd] < TOPK).mean() > 0.9


def test_heads_of_an_untied_model_rank_by_its_lm_head_not_its_embedding():
    """An untied model (Qwen2.5's GGUF) drafts through its LM head; the embedding only feeds
    the root token. Untrained heads (zero weights) are the base LM head, so the base model's
    own choices rank first through ``lm_head`` and almost never through the embedding."""
    from hetcomp.speculative.medusa import TOPK, heldout_ranks, train_heads

    rng = np.random.default_rng(2)
    e, v = 16, 64
    embed, lm_head = (rng.normal(size=(v, e)).astype(np.float32) for _ in range(2))
    h = rng.normal(size=(96, e)).astype(np.float32)
    targets = np.stack([np.argmax(h @ lm_head.T, 1)] * 2, 1)
    roots = rng.integers(0, v, len(h))
    zero = MedusaHeads(np.zeros((2, e, e), np.float32), np.zeros((2, e), np.float32),
                       np.zeros((2, TOPK)), {}, u=np.zeros((2, e, e), np.float32))
    assert (heldout_ranks(zero, h, targets, embed, roots=roots, lm_head=lm_head) == 0).all()
    assert (heldout_ranks(zero, h, targets, embed, roots=roots) == 0).mean() < 0.3
    # Training against the LM head keeps them first (the loss starts at its optimum's side).
    w, b, u = train_heads(h, targets, embed, 2, epochs=2, progress=False, roots=roots,
                          lm_head=lm_head)
    trained = MedusaHeads(w, b, np.zeros((2, TOPK)), {}, u=u)
    assert (heldout_ranks(trained, h, targets, embed, roots=roots, lm_head=lm_head) == 0
            ).mean() > 0.95


@pytest.mark.parametrize("device_len", [False, True], ids=["default", "device_len"])
def test_draft_vocabulary_in_the_compiled_draft(tiny_speculative, tmp_path, device_len):
    """Heads with a draft vocabulary compile to a draft whose LM head holds just those rows
    (rebuilt by recipe), whose candidates are real token ids from the vocabulary, equal to
    numpy's, and speculation stays lossless. ``device_len``: the build for CUDA graphs (run
    here on the CPU), whose draft ranks with ``script_ops.topk_rows`` and maps the ids in
    the same kernel instead of TVM's topk and take."""
    import os

    from hetcomp import _tvm
    from hetcomp.kernels.ops import unpack_linear_weight

    heads = MedusaHeads.load(os.path.join(os.path.dirname(tiny_speculative.path), "heads.npz"))
    heads.vocab = np.sort(np.random.default_rng(2).choice(TINY.vocab_size, 96, replace=False)
                          ).astype(np.int32)
    heads.save(str(tmp_path / "heads.npz"))
    loaded = (TINY, random_weights(TINY, seed=11), byte_tokenizer_spec(TINY.vocab_size),
              __file__)
    compile_model(CompileOptions(model="tiny", heads=str(tmp_path / "heads.npz"),
                                 widths=WIDTHS, draft_dtype="float16", device_len=device_len),
                  str(tmp_path / "a"), quiet=True, weights=loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert art.manifest["draft_vocab"] == 96
    draft_rules = {k["name"]: k["rule"] for k in art.manifest["kernels"]
                   if k["function"] == "medusa"}
    assert ("medusa_topk_w3" in draft_rules) == device_len, draft_rules
    assert art.manifest["functions"]["medusa"][-1] == "medusa.vocab"
    head = unpack_linear_weight(art.medusa_params[1].numpy())
    full = unpack_linear_weight(tiny_speculative.medusa_params[0].numpy())
    np.testing.assert_array_equal(head, full[heads.vocab].astype(np.float16))
    sess = art.new_session()
    _, hidden = sess.prefill([1, 2, 3])
    root = _tvm.tensor(np.array([[0], [17]], "int32"))
    logits, top, _ = (x.numpy() for x in art._medusa(hidden, root, *art.medusa_params))
    expected = heads.hidden(hidden.numpy().astype(np.float64),
                            full[[17]].astype(np.float64)) @ head.T.astype(np.float64)
    np.testing.assert_allclose(logits, expected[:, 0], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(top, heads.vocab[np.argsort(-logits, axis=1)[:, :10]])
    for prompt in ([5, 17, 99], [42]):
        seq = generate(art, prompt, max_new_tokens=30, stop_at_eos=False).ids
        for w in WIDTHS:
            assert generate(art, prompt, max_new_tokens=30, stop_at_eos=False,
                            width=w).ids == seq


def test_teacher_forcing_replays_generation(tiny_speculative, tmp_path):
    """A recorded greedy response replayed through verify/commit gives the hidden states that
    generating it recorded; a response the model would not give is refused."""
    from hetcomp.driver.calibrate import read_responses, teacher_force

    art = tiny_speculative
    hs: list = []
    ids = generate(art, [5, 17, 99], max_new_tokens=90, stop_at_eos=False,
                   hidden_states=hs).ids
    np.testing.assert_allclose(teacher_force(art, [5, 17, 99], ids, chunk=16), np.stack(hs),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(HetcompError, match="disagrees"):
        teacher_force(art, [5, 17, 99],
                      list(np.random.default_rng(0).integers(3, TINY.vocab_size, len(ids))))
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(HetcompError, match="cannot read responses"):
        read_responses(str(bad))


def test_heldout_prompts_are_the_packaged_heads_unseen_split():
    """`hetcomp bench --prompts heldout` decodes prompts the packaged heads never trained on:
    the held-out split their calibration recorded (same count, disjoint from training)."""
    from hetcomp.data import packaged_file
    from hetcomp.driver.calibrate import heldout_prompts, read_responses, split_prompts
    from hetcomp.driver.tuning import DEFAULT_HEADS

    info = MedusaHeads.load(DEFAULT_HEADS).info
    held = heldout_prompts(info, count=10_000)
    assert len(held) == info["held_out_prompts"]
    responses = packaged_file(info["responses"])
    train, _ = split_prompts(CalibrateOptions(corpus=info["corpus"], seed=info["seed"],
                                              responses=responses, recorded_only=True),
                             read_responses(responses))
    assert len(train) == info["train_prompts"] and not set(held) & set(train)
    assert heldout_prompts(info) == held[:8]


def test_heldout_prompts_redraw_the_calibration_split(tiny_speculative):
    """Heads calibrated on part of a corpus (``max_prompts``) or with another held-out share
    record them: `bench --prompts heldout` then draws exactly the prompts they held out
    (with the defaults, 4 of the 6 it drew for 10 prompts were training prompts)."""
    from hetcomp.driver.calibrate import heldout_prompts, split_prompts

    data = load_cache(os.path.join(os.path.dirname(tiny_speculative.path), "data.npz"))
    corpus = os.path.join(os.path.dirname(tiny_speculative.path), "corpus.txt")
    opts = CalibrateOptions(corpus=corpus, num_heads=2, epochs=1, held_out=0.3,
                            max_prompts=10)
    info = calibrate(None, random_weights(TINY, seed=11)["embed"], opts, progress=False,
                     data=data).info
    train, held = split_prompts(opts)
    assert (len(train), len(held)) == (7, 3)
    assert heldout_prompts(info, count=100) == held


def test_calibration_keeps_its_responses_for_the_store_and_the_replay(tiny_speculative,
                                                                     tmp_path):
    """Heads calibrated by generating (no recorded responses file) keep what they trained
    on and were measured on: the training responses become the artifact's datastore (`compile
    --datastore auto`), and compile's width choice replays the held-out prompts' responses
    (before, such heads had no store and fell back to the trees' tau)."""
    from hetcomp.driver.calibrate import fits, heldout_sequences, prompt_ids, split_prompts
    from hetcomp.driver.inspect import inspect_path
    from hetcomp.speculative.acceptance import replay_acceptance
    from hetcomp.speculative.datastore import pack_sequences

    folder = os.path.dirname(tiny_speculative.path)
    base = load_artifact(os.path.join(folder, "base"))
    heads = MedusaHeads.load(os.path.join(folder, "heads.npz"))
    train, held = split_prompts(CalibrateOptions(corpus=os.path.join(folder, "corpus.txt"),
                                                 held_out=0.25))

    def greedy(prompts):  # each prompt that fits, with base's greedy response, as calibrated
        ids = [prompt_ids(base.tokenizer, p) for p in prompts]
        return [(i, generate(base, i, 40).ids) for i in ids
                if fits(len(i), 40, base.config.max_context)]

    want = greedy(held)
    assert [(p.tolist(), r.tolist()) for p, r in heads.heldout] == want
    assert sum(len(r) for _, r in want) == len(heads.ranks)  # the rows of the ranks, in order
    assert [r.tolist() for r in heads.responses] == [r for _, r in greedy(train)]
    summary = inspect_path(os.path.join(folder, "heads.npz"))  # `hetcomp inspect` says so
    assert (summary["training_responses"], summary["held_out_responses"]) == (
        len(heads.responses), len(want))
    # re-training on the saved data keeps the same; data saved without prompts keeps no
    # held-out pairs (nothing to replay), still the responses
    cache = os.path.join(folder, "data.npz")
    opts = CalibrateOptions(corpus="unused", num_heads=3, new_tokens=40, epochs=1)
    again = calibrate(None, random_weights(TINY, seed=11)["embed"], opts, progress=False,
                      data=load_cache(cache))
    assert [(p.tolist(), r.tolist()) for p, r in again.heldout] == want
    with np.load(cache) as z:
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if "_p" not in k})
    old = calibrate(None, random_weights(TINY, seed=11)["embed"], opts, progress=False,
                    data=load_cache(str(tmp_path / "old.npz")))
    assert old.heldout is None and len(old.responses) == len(heads.responses)

    art, m = tiny_speculative, tiny_speculative.manifest
    assert m["speculative"]["datastore"] == {
        "source": "greedy responses generated at calibration, kept in the heads",
        "sequences": len(heads.responses), "tokens": sum(len(r) for r in heads.responses)}
    np.testing.assert_array_equal(art.datastore.tokens, pack_sequences(heads.responses))
    measured = m["width_measurement"]
    assert measured["tau_source"].startswith(f"replayed: {len(want)} held-out")
    seqs = heldout_sequences(heads, art.tokenizer, art.config.vocab_size)
    for w in WIDTHS:
        replayed = replay_acceptance(seqs, heads.ranks, art.tree, w, m["lookup"][str(w)],
                                     art.datastore)
        assert measured["tau"][str(w)] == pytest.approx(replayed.tokens_per_step, abs=1e-4)


def test_replay_check_compares_decoding_with_its_replay(tiny_speculative, capsys,
                                                         monkeypatch):
    """benchmarks/replay_check.py on the fixture's heads (kept held-out responses) and
    artifact: every step's accepted tokens equal the replay's, with the artifact's lookup
    nodes and with the Medusa tree alone; a replay that ranks every candidate one lower
    (fewer tokens accepted) is reported and fails the check."""
    import importlib.util

    from hetcomp.driver import benchmark  # (where replay_check's replay is called)

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "replay_check.py")
    spec = importlib.util.spec_from_file_location("replay_check", path)
    replay_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay_check)
    heads = os.path.join(os.path.dirname(tiny_speculative.path), "heads.npz")
    args = [tiny_speculative.path, heads, "--widths", "1,4,16", "--tokens", "40"]
    for extra in ([], ["--lookup", "0"]):
        assert replay_check.main(args + extra) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 3 and all("0 steps differ, 0 decodes left" in line for line in out)
    real = benchmark.replay_acceptance
    monkeypatch.setattr(benchmark, "replay_acceptance", lambda seqs, ranks, *a: real(
        seqs, np.where(ranks >= 0, ranks + 1, ranks), *a))
    assert replay_check.main(args + ["--lookup", "0"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "0 steps differ" in out[0] and "0 steps differ" not in out[1]  # (W = 1: no tree)


def test_bench_replays_an_artifact_of_heads_calibrated_here(tiny_speculative, monkeypatch):
    """`bench`'s replay column finds the heads an artifact was compiled from by the path the
    manifest records (they are not the package's), where the file still holds the bytes its
    sha256 names: replayed over their kept responses, each held-out prompt's steps accept
    what its decode accepts. A moved or changed heads file gives no replay."""
    from hetcomp.driver.benchmark import replayed_steps
    from hetcomp.runtime.weights import recorded_heads

    art, folder = tiny_speculative, os.path.dirname(tiny_speculative.path)
    assert recorded_heads(art.manifest) == os.path.join(folder, "heads.npz")
    heads = MedusaHeads.load(os.path.join(folder, "heads.npz"))
    prompts = [p.tolist() for p, _ in heads.heldout[:2]]
    replayed = replayed_steps(art, prompts, 32, {4: 3, 16: 0})
    for w, lookup in ((4, 3), (16, 0)):
        for prompt, rep in zip(prompts, replayed[w], strict=True):
            res = generate(art, prompt, 32, stop_at_eos=False, width=w, lookup=lookup)
            assert rep.tokens_per_step == pytest.approx(res.accepted_per_step), (w, prompt)
    info = art.manifest["speculative"]["heads_file"]
    for elsewhere in (os.path.join(folder, "moved.npz"), os.path.join(folder, "data.npz")):
        monkeypatch.setitem(info, "path", elsewhere)
        assert recorded_heads(art.manifest) is None
        assert replayed_steps(art, prompts, 32, {4: 3}) is None


def test_kept_sequences_that_disagree_are_refused(tmp_path):
    """Held-out responses that do not add up to the ranks' rows (or lack their prompts), and
    arrays that are not token sequences, are refused when the heads are read."""
    e = 8
    w, b = np.zeros((2, e, e), "float32"), np.zeros((2, e), "float32")
    probs, ranks = np.full((2, 10), 0.1), np.zeros((5, 2), "int8")
    pair = (np.array([1, 2]), np.array([3, 4, 5, 6, 7]))
    MedusaHeads(w, b, probs, {}, ranks, responses=[np.array([9, 9])], heldout=[pair]).save(
        str(tmp_path / "h.npz"))
    kept = MedusaHeads.load(str(tmp_path / "h.npz"))
    assert [x.tolist() for x in kept.heldout[0]] == [[1, 2], [3, 4, 5, 6, 7]]
    assert [r.tolist() for r in kept.responses] == [[9, 9]]
    for heldout in ([(pair[0], pair[1][:4])], [pair, pair]):
        MedusaHeads(w, b, probs, {}, ranks, heldout=heldout).save(str(tmp_path / "h.npz"))
        with pytest.raises(HetcompError, match="held-out responses that do not match"):
            MedusaHeads.load(str(tmp_path / "h.npz"))
    MedusaHeads(w, b, probs, {}, None, heldout=[pair]).save(str(tmp_path / "h.npz"))
    with pytest.raises(HetcompError, match="held-out responses that do not match"):
        MedusaHeads.load(str(tmp_path / "h.npz"))
    with np.load(str(tmp_path / "h.npz")) as z:
        arrays = dict(z)
    for name, value in (("heldout_prompts", None),
                        ("responses", np.array([9, 9])),  # (no separator after the last)
                        ("responses", np.array([-2, 2, -1])),
                        ("responses", np.array([0.5, -1.0]))):
        bad = {k: v for k, v in arrays.items() if k != name}
        if value is not None:
            bad[name] = value
        np.savez(str(tmp_path / "bad.npz"), **bad)
        with pytest.raises(HetcompError, match="cannot read Medusa heads"):
            MedusaHeads.load(str(tmp_path / "bad.npz"))


def test_one_head_compiles_the_widths_it_can_fill(tmp_path, capfd):
    """One head of 10 candidates drafts at most 11 nodes: compile leaves out wider verify
    steps (they crashed at run time with rows no draft filled), says so, and refuses a
    --width beyond them; what it keeps speculates losslessly."""
    e, rng = TINY.hidden_size, np.random.default_rng(0)
    MedusaHeads(w=(rng.standard_normal((1, e, e)) * 0.05).astype("float32"),
                b=np.zeros((1, e), "float32"), rank_probs=np.linspace(0.5, 0.05, 10)[None],
                info={}).save(str(tmp_path / "one.npz"))
    w = random_weights(TINY, seed=11, scale=0.3)
    loaded = (TINY, w, byte_tokenizer_spec(TINY.vocab_size), __file__)
    opts = CompileOptions(model="tiny", heads=str(tmp_path / "one.npz"))
    compile_model(opts, str(tmp_path / "art"), weights=loaded)
    assert "widths 16, 32, 64 left out" in capfd.readouterr().err
    art = load_artifact(str(tmp_path / "art"))
    assert art.widths == [1, 2, 4, 8]
    seq = generate(art, [5, 17, 99], max_new_tokens=24, stop_at_eos=False).ids
    for width in art.widths:
        res = generate(art, [5, 17, 99], max_new_tokens=24, stop_at_eos=False, width=width)
        assert res.ids == seq, width
    with pytest.raises(HetcompError, match="at most 11 nodes"):
        compile_model(dataclasses.replace(opts, default_width=16), str(tmp_path / "w16"),
                      quiet=True, weights=loaded)


def test_heads_whose_statistics_disagree_with_them_are_refused(tmp_path):
    """Statistics for another number of heads or candidates would build trees with nodes
    for a head that does not exist: refused when the file is read."""
    e, rng = 8, np.random.default_rng(1)
    w, b = rng.standard_normal((2, e, e)).astype("float32"), np.zeros((2, e), "float32")
    for probs, ranks in ((np.full((2, 10), 0.1), np.zeros((5, 4), "int8")),
                         (np.full((2, 12), 0.1), None),
                         (np.full((2, 10), 0.1), np.full((5, 2), 11, "int8")),
                         (np.full((2, 10), 0.1), np.full((5, 2), -5, "int8"))):  # -1: none
        MedusaHeads(w, b, probs, {}, ranks).save(str(tmp_path / "h.npz"))
        with pytest.raises(HetcompError, match="inconsistent"):
            MedusaHeads.load(str(tmp_path / "h.npz"))
    MedusaHeads(w, b, np.full((2, 10), 0.1), {}, np.full((5, 2), 10, "int8")).save(
        str(tmp_path / "h.npz"))
    assert MedusaHeads.load(str(tmp_path / "h.npz")).num_heads == 2
    # Values no calibration writes: refused too, not a crash (or NaN in `inspect --json`).
    for probs, ww, needle in ((np.full((2, 10), np.nan), w, "not probabilities"),
                              (np.full((2, 10), 1.5), w, "not probabilities"),
                              (np.full((2, 10), 0.1), w * np.inf, "not finite")):
        MedusaHeads(ww, b, probs, {}, None).save(str(tmp_path / "h.npz"))
        with pytest.raises(HetcompError, match=needle):
            MedusaHeads.load(str(tmp_path / "h.npz"))
    with np.load(str(tmp_path / "h.npz")) as z:
        arrays = dict(z)
    np.savez(str(tmp_path / "s.npz"), **arrays, ranks=np.array([["a", "b"]]))
    with pytest.raises(HetcompError, match="ranks hold <U1, not integers"):
        MedusaHeads.load(str(tmp_path / "s.npz"))
    # A draft vocabulary of ids int32 cannot hold, or of no ids at all, was cast silently
    # (2**40 -> 0, 0.5 -> 0); float64 weights past float32's range warned on stderr.
    for vocab, needle in ((np.array([3, 2**40]), "vocab holds ids past int32's range"),
                          (np.array([-2**40, 5]), "vocab holds ids past int32's range"),
                          (np.array([0.5, 1.7]), "vocab hold float64, not integers")):
        np.savez(str(tmp_path / "v.npz"), **arrays, vocab=vocab)
        with pytest.raises(HetcompError, match=needle):
            MedusaHeads.load(str(tmp_path / "v.npz"))
    np.savez(str(tmp_path / "big.npz"), **{**arrays, "w": arrays["w"].astype(np.float64) * 1e300})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way to the one line
        with pytest.raises(HetcompError, match="not finite"):
            MedusaHeads.load(str(tmp_path / "big.npz"))
