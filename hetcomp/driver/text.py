"""Text in, text out: streamed generation and a multi-turn chat that keeps its KV cache.

Runs with a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``): it imports the runtime and the
tokenizer, never the compiler.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import HetcompError
from ..runtime import Artifact, load_artifact  # noqa: F401  (the API's `load`)
from ..runtime.generate import (
    Generation,
    GenerationResult,
    TextStream,
    check_context,
    check_decoding,
    context_room,
    default_lookup,
)


def default_width(art: Artifact) -> int:
    """The width ``generate`` speculates at unless told: the one the artifact was compiled
    for (``manifest["default_width"]``), else 1 (no speculation)."""
    width = int(art.manifest.get("default_width") or 1)
    return width if width == 1 or width in art.trees else 1


class TextGeneration:
    """Iterate for the text of each step as it is accepted; :attr:`result` once done."""

    def __init__(self, gen: Generation, tokenizer):
        self.generation, self._stream = gen, TextStream(tokenizer)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        for ids in self.generation:
            text = self._stream.push(ids)
            if text:
                yield text
        tail = self._stream.finish()  # a character the last token left incomplete
        if tail:
            yield tail
        self.result = self.generation.result()


def generate(artifact: str | Artifact, prompt: str | list[int], *, chat: bool = False,
             max_new_tokens: int = 64, width: int | None = None, lookup: int | None = None,
             stop_at_eos: bool = True) -> TextGeneration:
    """Greedy generation from ``prompt`` (text, or token ids) that streams its text.

    ``for piece in generate(art, "Hello"): print(piece, end="")`` prints the text as each
    verify step accepts tokens; the returned object's ``result`` then holds the ids and
    timings. ``width``: the token-tree width (default :func:`default_width`); ``lookup``:
    n-gram draft tokens inside it (default: the artifact's choice for the width,
    :func:`~hetcomp.runtime.generate.default_lookup`).
    """
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    ids = art.tokenizer.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
    width = default_width(art) if width is None else width
    lookup = default_lookup(art, width) if lookup is None else lookup
    gen = Generation(art, ids, max_new_tokens=max_new_tokens, width=width, lookup=lookup,
                     stop_at_eos=stop_at_eos)
    return TextGeneration(gen, art.tokenizer)


class Chat:
    """A multi-turn conversation on one KV cache.

    Each turn renders the whole conversation with the model's chat template, keeps the
    cached tokens it shares with that rendering, and prefills only the rest (the new user
    turn and the template's markers), so the reply is the one a fresh generation of the
    whole conversation would give.

    When the conversation, the new turn and its reply (``max_new_tokens``) would not fit the
    context, the oldest exchanges (a user turn and its reply; the system message stays) are
    dropped from :attr:`messages` until the prompt takes at most half of the room (so the
    next turns append to the cache again instead of each dropping one exchange and
    prefilling the rest anew), and the conversation from the first change on is prefilled
    again: the reply is then the one a fresh generation of the kept conversation gives.
    :attr:`last_dropped` counts a turn's dropped exchanges.
    """

    def __init__(self, artifact: str | Artifact, max_new_tokens: int = 256,
                 width: int | None = None, lookup: int | None = None,
                 system: str | None = None):
        self.art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        if self.art.tokenizer.chat_template is None:
            raise HetcompError("this model has no chat template: `hetcomp chat` needs one")
        self.width = default_width(self.art) if width is None else width
        self.lookup = default_lookup(self.art, self.width) if lookup is None else lookup
        self.max_new_tokens = max_new_tokens
        # Options no turn could fit are refused now, not after the user's first line.
        check_decoding(self.art, max_new_tokens, self.width, self.lookup)
        check_context(self.art, 1, max_new_tokens, "a turn")
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        if system:  # the system message stays in every turn: it must fit with an empty one
            check_context(self.art, len(self.prompt_ids("")), max_new_tokens,
                          "the system message with a turn")
        self.session = self.art.new_session()
        self.last: GenerationResult | None = None
        self.last_prefilled = self.last_dropped = 0

    def prompt_ids(self, text: str, messages: list[dict] | None = None) -> list[int]:
        """The token ids of the conversation so far (or ``messages``) plus the user turn
        ``text``."""
        msgs = [*(self.messages if messages is None else messages),
                {"role": "user", "content": text}]
        return self.art.tokenizer.encode_text(self.art.tokenizer.render(msgs))

    def fit(self, text: str) -> tuple[list[int], int]:
        """``(prompt ids, exchanges dropped)``: the conversation plus the user turn ``text``,
        its oldest exchanges dropped until the prompt and the reply fit the context."""
        context = self.art.config.max_context
        room = context_room(self.art, self.max_new_tokens)
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        ids = self.prompt_ids(text)
        if len(ids) <= room:
            return ids, 0
        kept = list(self.messages)  # changed only if the turn fits: a refusal keeps them
        while len(ids) > room // 2 and len(kept) - first >= 2:
            del kept[first: first + 2]
            ids = self.prompt_ids(text, kept)
        if len(ids) > room:
            raise HetcompError(
                f"this turn ({len(ids)} tokens with the template) and --max-new-tokens "
                f"({self.max_new_tokens}) do not fit the context of {context} tokens")
        dropped = (len(self.messages) - len(kept)) // 2
        self.messages = kept
        return ids, dropped

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to the user turn ``text``; the turn is kept once it is done."""
        ids, dropped = self.fit(text)
        gen = Generation(self.art, ids, max_new_tokens=self.max_new_tokens, width=self.width,
                         lookup=self.lookup, session=self.session)
        reply = TextGeneration(gen, self.art.tokenizer)
        yield from reply
        self.last, self.last_prefilled, self.last_dropped = reply.result, gen.prefilled, dropped
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": self.last.text}]
