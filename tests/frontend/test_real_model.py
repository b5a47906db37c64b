"""SmolLM2-135M-Instruct (the packaged GGUF): logits against numpy, tokens against transformers."""


import numpy as np
import pytest

from hetcomp.runtime import generate, load_artifact
from hetcomp.runtime.generate import auto_lookup
from hetcomp.testing import numpy_llama as ref
from hetcomp.testing.reference import CHAT_PROMPTS

TEXTS = [
    "Hello, world! 12345 The quick brown fox.",
    "I'm   here\n\nnewline  tabs\tok, don't we'll they've",
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé façade — naïve café 東京 🚀",
    "<|im_start|>user\nhi<|im_end|>",
]


def test_last_position_logits_match_numpy(smollm2_artifact, smollm2_weights):
    cfg, w, _, _ = smollm2_weights
    art = load_artifact(smollm2_artifact)
    prompt = art.tokenizer.encode("The three primary colours are")
    sess = art.new_session()
    nxt, hidden = sess.prefill(prompt)
    _, _, logits = sess.verify([nxt], [sess.length], np.ones((1, 1)))
    ref_logits, _ = ref.forward(cfg, w, prompt + [nxt])
    err = np.abs(logits.numpy()[0] - ref_logits[-1]).max() / np.abs(ref_logits[-1]).max()
    assert err < 1e-4


@pytest.fixture(scope="module")
def hf_reference():
    """transformers' own GGUF loader: an independent tokenizer and LLaMA implementation."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hetcomp.testing.reference import transformers_smollm2

    return transformers_smollm2()


def _chat_ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_tokenizer_matches_reference(smollm2_artifact, hf_reference):
    tok, _ = hf_reference
    art = load_artifact(smollm2_artifact)
    for text in TEXTS:
        assert art.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False), text
    for prompt in CHAT_PROMPTS:
        assert art.tokenizer.encode(prompt, chat=True) == _chat_ids(tok, prompt)
    # Generation ends where llama.cpp ends it on this GGUF: its eos, then <|endoftext|>, and
    # <reponame>, which llama.cpp takes for the FIM repository token.
    assert [tok.convert_ids_to_tokens(i) for i in art.tokenizer.eos_token_ids] == [
        "<|im_end|>", "<|endoftext|>", "<reponame>"]


def test_greedy_generation_matches_reference(smollm2_artifact, hf_reference):
    import torch

    tok, model = hf_reference
    art = load_artifact(smollm2_artifact)
    for prompt in CHAT_PROMPTS:
        ids = art.tokenizer.encode(prompt, chat=True)
        ours = generate(art, ids, max_new_tokens=32).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        assert ours == theirs, prompt


def test_speculation_at_every_width_equals_sequential_greedy(smollm2_medusa_artifact):
    """The packaged Medusa heads, widths 1-64: W = 1, 2 run the fused attention kernel,
    W >= 4 the dense + sparse (CSR, x86 rule) + merge split; every width's tokens equal
    sequential greedy decoding's. (The artifact `hetcomp compile --model smollm2` builds,
    shared with tests/driver/test_compile_defaults.py.)"""
    art = load_artifact(str(smollm2_medusa_artifact))
    assert art.manifest["speculative"]["heads_file"]["name"] == "smollm2-medusa.npz"
    assert art.manifest["widths"] == [1, 2, 4, 8, 16, 32, 64]
    tok = art.tokenizer
    prompt = tok.encode_text(tok.render([{"role": "user", "content": CHAT_PROMPTS[1]}]))
    seq = generate(art, prompt, max_new_tokens=32, stop_at_eos=False).ids
    for w in (2, 4, 8, 16, 32, 64):
        res = generate(art, prompt, max_new_tokens=32, stop_at_eos=False, width=w)
        assert res.ids == seq, f"width {w}"
        assert res.steps < 31 or w == 2  # the trees were accepted past their roots
        # with the n-gram lookup tree that `generate` and `bench` draft by default
        res = generate(art, prompt, max_new_tokens=32, stop_at_eos=False, width=w,
                       lookup=auto_lookup(w))
        assert res.ids == seq, f"width {w}, lookup {auto_lookup(w)}"


def test_float16_cache_greedy_equals_float32_cache(tmp_path_factory, smollm2_weights,
                                                   smollm2_artifact):
    """float32 weights, float16 KV cache (`--kv-dtype float16`) against the float32 cache:
    the same greedy ids over 48 tokens, except after a near tie that float16's rounding of
    K/V flips. Measured: equal ids, except "Give me two tips for sleeping better." from
    generated position 10: there the float32 cache picks 30 (logit 19.39715) over 42
    (19.39580), the float16 cache 42 (19.39716) over 30 (19.39704); before it, logits
    within 2.1e-3 of the largest (7e-4 to 9e-4 on the other prompts)."""
    from hetcomp.driver.compile import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("smollm2-kv16") / "art"
    compile_model(CompileOptions(model="smollm2", kv_dtype="float16"), str(out), quiet=True,
                  weights=smollm2_weights)
    arts = [load_artifact(smollm2_artifact), load_artifact(str(out))]
    assert arts[1].new_session().k_cache.dtype == "float16"
    for prompt in CHAT_PROMPTS:
        ids = arts[0].tokenizer.encode(prompt, chat=True)
        runs = []
        for art in arts:
            s = art.new_session()
            toks, logits = [s.prefill(ids)[0]], [None]
            for _ in range(47):
                g, _, lg = s.verify([toks[-1]], [s.length], np.ones((1, 1), "int32"))
                s.commit([0])
                toks.append(int(g[0]))
                logits.append(lg.numpy()[0])
            runs.append((toks, logits))
        (a, la), (b, lb) = runs
        div = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for i in range(1, div if div is not None else len(a)):
            assert np.abs(la[i] - lb[i]).max() / np.abs(la[i]).max() < 5e-3, (prompt, i)
        if div is not None:  # a near tie in the float32 cache's own logits
            assert div > 0, prompt
            assert la[div][a[div]] - la[div][b[div]] < 1e-2, (prompt, div)


def test_datastore_is_the_heads_training_responses_and_drafts_more(smollm2_medusa_artifact):
    """`compile` puts the recorded responses the packaged heads trained on into the artifact
    (the held-out prompts' left out), and the lookup draft searches them: W = 64 decodes a
    held-out prompt with the store to the output of sequential greedy decoding, and over all
    153 held-out responses accepts more tokens a step with the store than without (replayed:
    3.77 against 3.66; the next test checks the replay against decoding, the store included;
    decoding three prompts both ways here took a minute of the suite)."""
    from hetcomp.data import packaged_file
    from hetcomp.driver.calibrate import heldout_prompts, heldout_sequences, read_responses
    from hetcomp.speculative.acceptance import replay_acceptance
    from hetcomp.speculative.medusa import MedusaHeads

    art = load_artifact(str(smollm2_medusa_artifact))
    info = art.manifest["speculative"]
    responses = read_responses(packaged_file("smollm2-responses.jsonl.gz"))
    held = heldout_prompts(info["heads_info"], count=len(responses))
    tokens = np.load(smollm2_medusa_artifact / "datastore.npy")
    stored = [tuple(s) for s in np.split(tokens, np.flatnonzero(tokens < 0) + 1)[:-1]]
    assert len(stored) == info["datastore"]["sequences"] == len(responses) - len(held) == 864
    training = {(*r, -1) for p, r in responses.items() if p not in set(held)}
    assert set(stored) == training  # (two training prompts have the same response)
    tok = art.tokenizer
    prompt = tok.encode_text(tok.render([{"role": "user", "content": held[0]}]))
    seq = generate(art, prompt, max_new_tokens=48, stop_at_eos=False).ids
    res = generate(art, prompt, max_new_tokens=48, stop_at_eos=False, width=64,
                   lookup=auto_lookup(64))
    assert res.ids == seq and res.accepted_per_step > 1
    heads = MedusaHeads.load(packaged_file(info["heads_file"]["name"]))
    seqs = heldout_sequences(heads, tok, art.config.vocab_size)
    accepted = {store is not None: replay_acceptance(seqs, heads.ranks, art.tree, 64,
                                                     auto_lookup(64), store).tokens_per_step
                for store in (art.datastore, None)}
    assert accepted[True] > accepted[False] + 0.05, accepted


def test_the_replay_accepts_what_decoding_accepts(smollm2_medusa_artifact):
    """Compile chooses the default width by the tokens a step replayed over the heads'
    held-out recorded responses (``speculative.acceptance``), the drafts' proposals given by
    the ranks calibration measured. Decoding the first held-out prompts for real, at widths
    with the default lookup and datastore (and W = 16 with neither), every step emits as
    many tokens as the replay's step does; the decode reproduces the recorded response first
    (the replay describes that response)."""
    from hetcomp.data import packaged_file
    from hetcomp.driver.benchmark import decoded_and_replayed
    from hetcomp.driver.calibrate import heldout_sequences
    from hetcomp.speculative.medusa import MedusaHeads

    art = load_artifact(str(smollm2_medusa_artifact))
    heads = MedusaHeads.load(packaged_file(art.manifest["speculative"]["heads_file"]["name"]))
    seqs = heldout_sequences(heads, art.tokenizer, art.config.vocab_size)
    assert len(seqs) == heads.info["held_out_prompts"] == 153
    assert all(len(r) >= 32 for _, r in seqs[:2])
    tokens, compared = 32, 0
    for w, lookup in ((4, auto_lookup(4)), (64, auto_lookup(64)), (16, 0)):
        for i, pair in enumerate(decoded_and_replayed(art, heads, w, lookup, tokens, 2)):
            assert pair is not None, (w, i)  # the decode reproduces the recorded response
            steps, replayed = pair
            assert replayed == steps, (w, lookup, i)
            compared += len(steps)
    assert compared < 3 * 2 * (tokens - 1)  # (steps accepted past their roots)
