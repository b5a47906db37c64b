"""A tokenizer built from a GGUF file's own vocabulary: byte-level BPE from its merges
(``tokenizer.ggml.model = gpt2``), or SentencePiece BPE from its scores (``llama``: Gemma).

The result is a HuggingFace ``tokenizers`` object, serialised into the artifact as
``tokenizer.json``, so the runtime needs neither the GGUF file nor this module.
"""

from __future__ import annotations

import functools
import json

import jinja2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import HetcompError

# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre`` (llama.cpp's llama-vocab.cpp).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 (its case variants of 's etc. written as (?i:)); as
# transformers' GGUF tokenizer, no NFC normalizer (Qwen2's own tokenizer.json has one).
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEXES = {"qwen2": _QWEN2_REGEX, "deepseek-r1-qwen": _QWEN2_REGEX}
_SPLIT_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
_SPACE = "\u2581"  # SentencePiece's visible space


def _spm_merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best piece first: the BPE merge list under which
    the ``tokenizers`` BPE model merges as llama.cpp's ``llm_tokenizer_spm`` does (the adjacent
    pair whose concatenation is the best-scoring piece, repeatedly).

    Pieces rank by their place in the file, which for Gemma's ordinary pieces is their score
    order (strictly decreasing); its control and user-defined pieces (score -1000) sit first
    but are matched whole before BPE runs. Splits of one piece: longer left part first (as
    transformers' ``generate_merges``, whose tokenizer the tests compare with)."""
    merges = []
    for rank, piece in enumerate(tokens):
        local = [(piece[:k], piece[k:]) for k in range(len(piece) - 1, 0, -1)
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(rank, -len(a), -len(b), a, b) for a, b in local]
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def _build_spm(spec: dict):
    """SentencePiece BPE with byte fallback (``<0xNN>`` pieces) and no space prefix, spaces
    written ``\u2581``; control pieces are special tokens, user-defined ones (Gemma's
    ``\n`` runs, HTML tags) are matched whole but decoded as text."""
    # Gemma's GGUF spells its whitespace-run pieces with real spaces, which text never reaches
    # (the normalizer turns spaces into U+2581): look them up as U+2581 runs.
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in spec["tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[spec["unk_token_id"]] if spec.get("unk_token_id") is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, vocab), fuse_unk=True,
                               unk_token=unk, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    _add_file_tokens(tok, spec, vocab)
    return tok


def build_tokenizer(spec: dict):
    """Build a ``tokenizers.Tokenizer`` equal to the model's reference tokenizer."""
    if spec.get("model") == "llama":
        return _build_spm(spec)
    tokens = spec["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = spec.get("pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = pre_tokenizers.Split(Regex(_REGEXES.get(pre, _GPT2_REGEX)), behavior="isolated",
                                 invert=False)
    steps = [split, byte_level]
    if pre in _SPLIT_DIGITS:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif pre not in ("default", "gpt2", "gpt-2", *_REGEXES):
        raise HetcompError(f"unsupported pre-tokenizer {pre!r}")
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    _add_file_tokens(tok, spec, vocab)
    return tok


def _add_file_tokens(tok, spec: dict, vocab: dict) -> None:
    """The tokens the file marks as CONTROL (``<|im_end|>``) as special ones, left out of
    decoded text, and those it marks USER_DEFINED (Qwen's ``<tool_call>``) as added tokens
    that are text: both matched whole when encoding, as llama.cpp and transformers' GGUF
    tokenizer do."""
    types = spec.get("token_type") or []
    tokens = spec["tokens"]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types)
                    if t == _TOKEN_USER_DEFINED and tokens[i] in vocab])


def tokenizer_to_json(tok) -> str:
    return tok.to_str()


def load_tokenizer_json(text: str):
    return Tokenizer.from_str(text)


def _template_env() -> jinja2.Environment:
    # transformers' settings (apply_chat_template): Qwen2.5's template ends in a newline that
    # keep_trailing_newline would add to the prompt.
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _template_refuses  # as transformers gives templates
    return env


def check_chat_template(template, where: str) -> str | None:
    """A model's chat template as loaded (None: it has none), refused in one line where it is
    not a string or not valid Jinja: found when the model is read, not at every chat turn."""
    if template is None:
        return None
    if not isinstance(template, str):
        raise HetcompError(f"the chat template in {where} is not a string")
    try:
        _template_env().from_string(template)  # parsed and compiled: names filters exist
    except jinja2.TemplateSyntaxError as e:
        raise HetcompError(f"the chat template in {where} is not valid Jinja: {e.message} "
                           f"(line {e.lineno})") from None
    return template


def render_messages(template: str | None, messages: list[dict], bos_token: str = "",
                    eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """Render the model's Jinja chat template for a conversation (``[{"role", "content"}]``),
    with the generation prompt of the assistant's next turn."""
    if not template:
        raise HetcompError("this model has no chat template; use --prompt without --chat")
    try:
        return _template_env().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:  # an artifact written before templates were checked
        raise HetcompError(f"the model's chat template fails: {e}") from None


def _template_refuses(message: str):
    """A chat template's ``raise_exception``: the conversation is not one it renders."""
    raise HetcompError(f"the model's chat template refuses this conversation: {message}")


def render_chat(template: str | None, prompt: str, bos_token: str = "",
                eos_token: str = "") -> str:
    """Render the model's chat template for one user turn, with the generation prompt."""
    return render_messages(template, [{"role": "user", "content": prompt}], bos_token, eos_token)


class TokenizerInfo:
    """The tokenizer plus the ids and template generation needs.

    ``eos_token_ids``: every id that ends generation (HF's generation_config may list
    several; GGUF adds end-of-turn ids); ``eos_token_id`` is the first, for older readers.
    """

    def __init__(self, tok, eos_token_ids: list[int], bos_token_id: int | None,
                 add_bos: bool, chat_template: str | None):
        self.tok = tok
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def _token(self, i: int | None) -> str:
        return (self.tok.id_to_token(i) or "") if i is not None else ""

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text``, rendered as one user turn with ``chat``."""
        if chat:
            return self.encode_text(self.render([{"role": "user", "content": text}]))
        return self.encode_text(text)

    def render(self, messages: list[dict]) -> str:
        """The conversation ``messages`` through the chat template, with the generation
        prompt; the template gets the real BOS/EOS text, as transformers renders it."""
        return render_messages(self.chat_template, messages, self._token(self.bos_token_id),
                               self._token(self.eos_token_id))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as it is (a rendered template included), BOS first if the
        model wants one and the text does not start with it."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the terminal or argv could not decode
            bad = text[e.start].encode("utf-8", "surrogateescape")
            raise HetcompError(f"the text is not UTF-8 (it holds the byte 0x{bad.hex()})"
                               ) from None
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """The byte-fallback pieces' ids (``<0x00>`` .. ``<0xFF>``) of a SentencePiece-style
        vocabulary, else none. The decoder turns a run of them into text as one unit: a run
        that is not UTF-8 becomes one U+FFFD a byte, its whole characters too."""
        if not getattr(self.tok.model, "byte_fallback", False):
            return frozenset()
        ids = (self.tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    def to_json(self) -> dict:
        return {
            "eos_token_id": self.eos_token_id,
            "eos_token_ids": self.eos_token_ids,
            "bos_token_id": self.bos_token_id,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> TokenizerInfo:
        """From a GGUF tokenizer spec, or an HF folder's (which carries ``tokenizer_json``)."""
        tok = (load_tokenizer_json(spec["tokenizer_json"]) if "tokenizer_json" in spec
               else build_tokenizer(spec))
        return cls(tok, _eos_ids(spec), spec.get("bos_token_id"),
                   spec.get("add_bos_token", False), spec.get("chat_template"))

    @classmethod
    def from_files(cls, tokenizer_json: str, meta: dict) -> TokenizerInfo:
        return cls(load_tokenizer_json(tokenizer_json), _eos_ids(meta),
                   meta.get("bos_token_id"), meta.get("add_bos", False), meta.get("chat_template"))


def _eos_ids(d: dict) -> list[int]:
    """``eos_token_ids``, or the single ``eos_token_id`` of older specs and manifests."""
    if d.get("eos_token_ids") is not None:
        return list(d["eos_token_ids"])
    return [] if d.get("eos_token_id") is None else [d["eos_token_id"]]


def json_dumps(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
