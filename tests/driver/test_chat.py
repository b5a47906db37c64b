"""Streamed generation and `hetcomp chat`: text as it is accepted; later turns reuse the cache."""

import json
import subprocess
import sys

import pytest

from hetcomp.driver import Chat, generate
from hetcomp.errors import HetcompError
from hetcomp.runtime import generate as generate_ids
from hetcomp.runtime import load_artifact

TURNS = ["What is the capital of France?", "And of Italy?"]


def test_generate_streams_the_same_text(smollm2_artifact):
    """The pieces `generate` yields join to the whole generation's text and ids."""
    gen = generate(smollm2_artifact, "Name three colours.", chat=True, max_new_tokens=20)
    pieces = list(gen)
    assert len(pieces) > 3  # streamed, not printed at the end
    art = load_artifact(smollm2_artifact)
    whole = generate_ids(art, art.tokenizer.encode("Name three colours.", chat=True),
                         max_new_tokens=20)
    assert gen.result.ids == whole.ids
    assert "".join(pieces) == whole.text


def test_a_character_cut_by_the_last_token_is_streamed_too(smollm2_artifact):
    """Text is held back while it ends in an incomplete character; when the generation stops
    there (its token budget spent), the rest still comes out, so the streamed pieces join to
    the result's text. SmolLM2 spells 日本語 as six byte-level tokens."""
    from hetcomp.driver.text import TextGeneration
    from hetcomp.runtime.generate import TextStream

    tok = load_artifact(smollm2_artifact, verify=False).tokenizer
    ids = tok.encode_text("日本語")
    cut = ids[:4]  # 日本 and the first byte of 語
    assert tok.decode(cut) == "日本\ufffd"
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in cut]
    assert "".join(pieces) == "日本"  # never a broken character mid-stream
    assert stream.finish() == "\ufffd" and stream.finish() == ""

    class Stopped:  # a generation whose steps accepted these ids, then ran out of tokens
        def __iter__(self):
            yield from ([i] for i in cut)

        def result(self):
            return tok.decode(cut)

    text = TextGeneration(Stopped(), tok)
    assert "".join(text) == text.result == "日本\ufffd"


def test_chat_fits_a_turn_the_same_at_every_width(smollm2_medusa_artifact):
    """What fits a turn does not depend on the width (the room is what sequential decoding
    needs: the last new token takes no cache position), so every width keeps the same
    conversation and replies to it alike; a turn one token longer is refused at each."""
    # (width 4 told, not the artifact's default: compile measures that here, and a loaded
    # machine can measure W=1 best)
    wide = Chat(str(smollm2_medusa_artifact), max_new_tokens=8, width=4)
    seq = Chat(wide.art, max_new_tokens=8, width=1)
    room = wide.art.config.max_context - 8 + 1
    base = len(wide.prompt_ids(""))
    text = " a" * (room - base)
    ids = wide.prompt_ids(text)
    assert len(ids) == room  # one token per " a"
    for chat in (wide, seq):
        assert chat.fit(text) == (ids, 0)
        with pytest.raises(HetcompError, match="do not fit the context"):
            chat.fit(text + " a")


def test_chat_second_turn_prefills_only_its_tokens(smollm2_artifact):
    """A scripted two-turn session on stdin: the second turn prefills only the new turn, and
    its reply equals a fresh generation of the whole conversation."""
    p = subprocess.run([sys.executable, "-m", "hetcomp", "chat", smollm2_artifact,
                        "--max-new-tokens", "24"], input="\n".join(TURNS) + "\n",
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    stats = [ln for ln in p.stderr.splitlines() if ln.startswith("[turn")]
    assert len(stats) == 2, p.stderr
    prefilled = [int(s.split("prefilled ")[1].split()[0]) for s in stats]

    art = load_artifact(smollm2_artifact)
    tok = art.tokenizer
    # Turn 1 prefills the whole rendered prompt.
    first = tok.encode_text(tok.render([{"role": "user", "content": TURNS[0]}]))
    assert prefilled[0] == len(first)
    one = generate_ids(art, first, max_new_tokens=24)
    assert p.stdout.lstrip("\n").startswith(one.text.strip("\n"))
    # Turn 2, fresh: the whole conversation rendered and generated from scratch.
    conv = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": one.text},
            {"role": "user", "content": TURNS[1]}]
    full = tok.encode_text(tok.render(conv))
    fresh = generate_ids(art, full, max_new_tokens=24)
    assert p.stdout.rstrip("\n").endswith(fresh.text.rstrip("\n"))
    # Only the new turn was prefilled: the cache kept turn 1's prompt and reply.
    kept = len(first) + len(one.ids) - 1
    assert prefilled[1] == len(full) - kept
    assert prefilled[1] < len(full) // 2


def test_chat_api_speculates_losslessly(smollm2_medusa_artifact):
    """The API speculating (W = 4, the lookup trie inside the tree): each turn's reply
    equals fresh sequential generation of the conversation so far, through a cache that
    speculation rolled back and the next turn extended. (The width is told: the artifact's
    default is what compile measured here, W = 1 on a loaded machine.)"""
    chat = Chat(str(smollm2_medusa_artifact), max_new_tokens=16, width=4)
    assert chat.lookup > 0
    replies = ["".join(chat.send(t)) for t in TURNS]
    assert chat.last_prefilled < 40
    art = chat.art
    tok = art.tokenizer
    for turn, reply in enumerate(replies):
        upto = chat.messages[:2 * turn + 1]  # the user turns and replies before this reply
        fresh = generate_ids(art, tok.encode_text(tok.render(upto)), max_new_tokens=16,
                             width=1)
        assert reply == fresh.text, turn
    assert json.dumps(chat.messages)  # a conversation that can be saved


def test_chat_drops_the_oldest_exchanges_when_the_context_is_full(smollm2_artifact):
    """A conversation that outgrows the context loses its oldest exchanges (the system
    message stays) down to half the room, and the reply is still the one a fresh generation
    of the kept conversation gives; a turn that cannot fit alone is one line of error."""
    chat = Chat(smollm2_artifact, max_new_tokens=8, system="Be brief.")
    tok, context = chat.art.tokenizer, chat.art.config.max_context
    sentence = "The quick brown fox jumps over the lazy dog. "
    long = "Count the foxes: " + sentence * (4 * context // 10 // len(tok.encode_text(sentence)))
    for t in (long, long):  # each ~0.4 of the context: two fit
        "".join(chat.send(t))
        assert chat.last_dropped == 0
    reply = "".join(chat.send(long))  # the third does not: both earlier exchanges go
    assert chat.last_dropped == 2
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    kept = tok.encode_text(tok.render(chat.messages[:-1]))
    assert len(kept) <= (context - 8 + 1) // 2
    assert 0 < chat.last_prefilled < len(kept)  # the system message's tokens stayed cached
    fresh = generate_ids(chat.art, kept, max_new_tokens=8)
    assert reply == fresh.text
    with pytest.raises(HetcompError, match="do not fit the context"):
        "".join(chat.send(long * 3))
    assert len(chat.messages) == 3  # a refused turn loses none of the conversation


def test_text_that_is_not_utf8_is_one_line_of_error(smollm2_artifact):
    """A line of stdin or a --prompt that is not UTF-8 (Latin-1 'café') is refused in one
    line, exit 2: read with the terminal's surrogate escapes or strictly, as Python may."""
    from hetcomp.testing import assert_one_line_error
    from hetcomp.testing import run_cli as run

    for env in ({}, {"PYTHONIOENCODING": "utf-8"}):
        p = subprocess.run([sys.executable, "-m", "hetcomp", "chat", smollm2_artifact,
                            "--max-new-tokens", "4"], input=b"caf\xe9\n",
                           capture_output=True, timeout=300, check=False,
                           env={**__import__("os").environ, **env})
        assert_one_line_error(p.returncode, p.stderr.decode(), "not UTF-8")
    rc, _, err = run("generate", smollm2_artifact, "--no-verify", "--prompt",
                     b"caf\xe9".decode("utf-8", "surrogateescape"), "--max-new-tokens", 4)
    assert_one_line_error(rc, err, "not UTF-8 (it holds the byte 0xe9)")


def test_a_template_that_refuses_a_conversation_says_why():
    """transformers gives chat templates ``raise_exception`` (Mistral's refuses a system
    turn with it): its message, as one line of error."""
    from hetcomp.frontend.tokenizer import render_messages

    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('Only user and "
                "assistant roles are supported!') }}{% endif %}[INST] {{ messages[0]['content'] }}")
    assert render_messages(template, [{"role": "user", "content": "hi"}]) == "[INST] hi"
    with pytest.raises(HetcompError, match="refuses this conversation: Only user and assistant"):
        render_messages(template, [{"role": "system", "content": "be brief"}])


def test_a_broken_template_is_one_line_where_it_shows():
    """A template that is not Jinja, or names a filter Jinja lacks, is refused when the model
    is read; one that fails only as it renders (an artifact compiled before that check) is
    one line at the turn, not a traceback."""
    from hetcomp.frontend.tokenizer import check_chat_template, render_messages

    with pytest.raises(HetcompError, match=r"in x is not valid Jinja: unexpected '}' \(line 1"):
        check_chat_template("{% for m in messages %}{{ m.content }", "x")
    with pytest.raises(HetcompError, match="not valid Jinja: No filter named 'nosuch'"):
        check_chat_template("{{ messages | nosuch }}", "x")
    with pytest.raises(HetcompError, match="in x is not a string"):
        check_chat_template(5, "x")
    assert check_chat_template(None, "x") is None
    calls = "{{ messages[0].content.nosuch() }}"
    assert check_chat_template(calls, "x") == calls
    with pytest.raises(HetcompError, match="chat template fails: .*nosuch"):
        render_messages(calls, [{"role": "user", "content": "hi"}])
    with pytest.raises(HetcompError, match="chat template fails: unexpected '}'"):
        render_messages("{% for m in messages %}{{ m.content }", [{"role": "user", "content": "hi"}])


def test_the_api_takes_ids_as_any_sequence_and_refuses_text_where_ids_go(tiny_artifact):
    """``hetcomp.generate`` (the runtime's) decodes token ids: text there is one line of
    error, not int('H')'s ValueError; the streaming ``driver.generate`` takes text or ids, a
    tuple of ids as a list."""
    import hetcomp

    art = load_artifact(tiny_artifact[0])
    with pytest.raises(HetcompError, match="must be token ids"):
        hetcomp.generate(art, "Hello", max_new_tokens=2)
    want = generate_ids(art, [5, 6, 7], max_new_tokens=4, stop_at_eos=False).ids
    for ids in ((5, 6, 7), [5, 6, 7]):
        text = generate(art, ids, max_new_tokens=4, stop_at_eos=False)
        "".join(text)
        assert text.result.ids == want


def test_chat_refuses_its_options_before_the_first_turn(smollm2_artifact):
    """A width the artifact lacks or a reply longer than the context is one line at start
    (it was accepted, and a session without input ended with status 0)."""
    from hetcomp.testing import assert_one_line_error

    for args, needle in ((("--width", 128), "width 128 is not available"),
                         (("--max-new-tokens", 5000), "--max-new-tokens (5000) does not fit")):
        p = subprocess.run([sys.executable, "-m", "hetcomp", "chat", smollm2_artifact, *map(
            str, args)], input="", capture_output=True, text=True, timeout=600, check=False)
        assert_one_line_error(p.returncode, p.stderr, needle)
    with pytest.raises(HetcompError, match="--lookup must be at least 0"):
        Chat(smollm2_artifact, lookup=-1)



def test_generate_reports_tokens_per_verify_step_only_when_a_step_ran(
        smollm2_medusa_artifact, cli):
    """One new token is the prefill's: no verify step ran, so none is reported (it said
    "width 4: 1.00 tokens per verify step")."""
    art = smollm2_medusa_artifact
    rc, _, err = cli("generate", art, "--prompt-ids", "1,2", "--max-new-tokens", 1, "--width", 4)
    assert rc == 0 and "[1 tokens" in err and "verify step" not in err, err
    rc, _, err = cli("generate", art, "--prompt-ids", "1,2", "--max-new-tokens", 3, "--width", 4)
    assert rc == 0 and "width 4: " in err and "tokens per verify step]" in err, err


def test_a_system_message_no_turn_fits_with_is_refused_up_front(smollm2_artifact):
    """The system message stays in every turn: one that leaves no room for a turn and its
    reply is refused when the chat starts, not at the user's first line (and blamed on it)."""
    with pytest.raises(HetcompError, match=r"the system message with a turn \(30\d\d tokens\)"):
        Chat(smollm2_artifact, max_new_tokens=4, system="word " * 3000)
    assert Chat(smollm2_artifact, max_new_tokens=4, system="Be brief.").messages[0] == {
        "role": "system", "content": "Be brief."}
