"""Tokenizers for the models that lora_jax reads: Hugging Face `tokenizer.json` directories and
the vocabulary stored inside a GGUF file, with the model's chat template.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library behind Hugging Face's fast
tokenizers), so that its ids equal those of `transformers.AutoTokenizer` on the same files:

- `Tokenizer.from_pretrained(directory)`: `tokenizer.json` (its post-processor says what
  ``encode(add_special_tokens=True)`` adds; like transformers 5, `add_bos_token` in
  `tokenizer_config.json` is not read), plus `tokenizer_config.json` (the special tokens,
  `chat_template`) and `chat_template.jinja` when present.
- `Tokenizer.from_gguf(path)`: llama.cpp's byte-level BPE vocabulary (``tokenizer.ggml.model``
  "gpt2"): tokens, token types (control tokens become special tokens, user-defined ones are
  matched whole), merges, the bos/eos/pad/unk ids, ``add_bos_token`` / ``add_eos_token`` and
  ``tokenizer.chat_template``. The text is split before BPE exactly as llama.cpp splits it for
  the file's ``tokenizer.ggml.pre`` (`PRE_TOKENIZERS`): e.g. "smollm" (SmolLM, StarCoder) isolates
  every numeric character, then applies GPT-2's split.

`apply_chat_template` renders the template with jinja2 the way transformers does (a sandboxed
environment with `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`,
`strftime_now` and a `tojson` that keeps non-ASCII text); the template sees `messages`,
`add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...).

`tokenizers`, `gguf` and `jinja2` are optional dependencies (``pip install "lora_jax[hf]"``).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_jax.io.gguf import open_gguf, read_metadata

try:
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
except ImportError:  # an optional dependency: the error comes when a function needs it
    tokenizers = None

try:
    import jinja2
    from jinja2 import ext as jinja2_ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    jinja2 = None

PathLike = str | os.PathLike
Message = Mapping[str, Any]

_INSTALL = 'pip install "lora_jax[hf]"'
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

# llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`), transcribed from its llama-vocab.cpp: the
# regular expressions that split the text one after the other (each match and each stretch
# between matches becomes a piece), and whether GPT-2's split follows (with the byte-level
# mapping) or the byte-level mapping alone.
_GPT2_SPLIT = ()  # GPT-2's own split, as tokenizers' ByteLevel(use_regex=True) applies it
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **{name: (_GPT2_SPLIT, True) for name in ("default", "gpt2", "mpt", "olmo", "jais")},
    **{
        name: ((r"\p{N}",), True)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
    },
    **{
        name: ((_LLAMA3_SPLIT,), False)
        for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral")
    },
    **{name: ((_QWEN2_SPLIT,), False) for name in ("qwen2", "deepseek-r1-qwen")},
}
"""`tokenizer.ggml.pre` -> (regular expressions applied in turn, then GPT-2's split or not)."""

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (1 is a normal token)


def _require(module: Any, name: str, what: str) -> None:
    if module is None:
        raise ImportError(f"{what} needs the '{name}' package: {_INSTALL}.")


class Tokenizer:
    """A text tokenizer with the model's special tokens and chat template.

    Build one with `from_pretrained` or `from_gguf`, or wrap a `tokenizers.Tokenizer`.

    Args:
      tokenizer: the `tokenizers.Tokenizer` that encodes and decodes.
      bos_token, eos_token, pad_token, unk_token: the special tokens' strings (None: none);
        each must be in the vocabulary.
      chat_template: the model's Jinja chat template, or None.

    Attributes:
      backend: the wrapped `tokenizers.Tokenizer`.
      chat_template: the Jinja chat template (None if the model has none).
      special_tokens: the special tokens that are set, e.g. ``{"bos_token": "<s>", ...}``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        _require(tokenizers, "tokenizers", "lora_jax.io.Tokenizer")
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"Tokenizer wraps a tokenizers.Tokenizer, got {type(tokenizer)}.")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a str or None, got {type(chat_template)}.")
        self.backend = tokenizer
        self.chat_template = chat_template
        given = dict(
            bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token
        )
        self.special_tokens = {k: v for k, v in given.items() if v is not None}
        self._ids = {}
        for name, token in self.special_tokens.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"Tokenizer: {name} {token!r} is not in the vocabulary.")
            self._ids[name] = token_id

    @classmethod
    def from_pretrained(cls, directory: PathLike) -> Tokenizer:
        """Reads a Hugging Face tokenizer directory (as `save_pretrained` writes it).

        Args:
          directory: holds `tokenizer.json`; optionally `tokenizer_config.json` (special
            tokens, `chat_template`), `special_tokens_map.json` and `chat_template.jinja`
            (which wins over the config's template).

        Raises:
          ImportError: `tokenizers` is not installed.
          ValueError: there is no `tokenizer.json`, or a file cannot be parsed.
        """
        _require(tokenizers, "tokenizers", "Tokenizer.from_pretrained")
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise ValueError(
                f"No tokenizer.json in '{directory}': Tokenizer reads fast-tokenizer files only "
                "(save one with transformers' tokenizer.save_pretrained)."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(os.fspath(file))
        except Exception as e:  # tokenizers raises its own Exception type on a bad file
            raise ValueError(f"Cannot read '{file}': {e}") from e
        config = _read_json(directory / "special_tokens_map.json") | _read_json(
            directory / "tokenizer_config.json"
        )
        special = {name: _token_content(config.get(name)) for name in _SPECIAL}
        jinja_file = directory / "chat_template.jinja"
        template = (
            jinja_file.read_text(encoding="utf-8")
            if jinja_file.is_file()
            else _default_template(config.get("chat_template"), directory)
        )
        return cls(backend, **special, chat_template=template)

    @classmethod
    def from_gguf(cls, path: PathLike) -> Tokenizer:
        """Builds the tokenizer that a GGUF file stores (llama.cpp's byte-level BPE, "gpt2").

        Args:
          path: the ``.gguf`` file (any architecture).

        Raises:
          ImportError: `tokenizers` or `gguf` is not installed.
          ValueError: the file is unreadable, holds no tokenizer, or one that is not byte-level
            BPE, or a ``tokenizer.ggml.pre`` that `PRE_TOKENIZERS` does not know.
        """
        _require(tokenizers, "tokenizers", "Tokenizer.from_gguf")
        meta = read_metadata(open_gguf(path), vocab=True)
        where = f"'{os.fspath(path)}'"
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{where} holds tokenizer.ggml.model {kind!r}; Tokenizer.from_gguf reads "
                "byte-level BPE vocabularies ('gpt2') only. Use Tokenizer.from_pretrained on the "
                "model's tokenizer.json instead."
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise ValueError(f"{where} lacks the metadata key {key}.")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"{where} asks for llama.cpp's pre-tokenizer {pre!r} (tokenizer.ggml.pre), "
                f"which Tokenizer.from_gguf does not implement; known: {sorted(PRE_TOKENIZERS)}."
            )
        tokens = meta["tokenizer.ggml.tokens"]
        backend = _bpe(tokens, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.token_type"))
        backend.pre_tokenizer = _pre_tokenizer(*PRE_TOKENIZERS[pre])
        backend.decoder = decoders.ByteLevel()

        def token(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            if token_id is None:
                return None
            if not 0 <= token_id < len(tokens):
                raise ValueError(
                    f"{where}: tokenizer.ggml.{key} is {token_id}, outside the vocabulary "
                    f"of {len(tokens)} tokens."
                )
            return tokens[token_id]

        special = dict(
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            pad_token=token("padding_token_id"),
            unk_token=token("unknown_token_id"),
        )
        _set_post_processor(
            backend,
            special["bos_token"] if meta.get("tokenizer.ggml.add_bos_token") else None,
            special["eos_token"] if meta.get("tokenizer.ggml.add_eos_token") else None,
        )
        return cls(backend, **special, chat_template=meta.get("tokenizer.chat_template"))

    @property
    def bos_id(self) -> int | None:
        """The id of the beginning-of-sequence token (None if the model has none)."""
        return self._ids.get("bos_token")

    @property
    def eos_id(self) -> int | None:
        """The id of the end-of-sequence token (None if the model has none)."""
        return self._ids.get("eos_token")

    @property
    def pad_id(self) -> int | None:
        """The id of the padding token (None if the model has none)."""
        return self._ids.get("pad_token")

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The token ids of `text`.

        Args:
          text: the text; special tokens written in it (``<|im_start|>``) become their ids.
          add_special_tokens: add what the model adds around a text (e.g. a BOS token).
            Pass False for text from `apply_chat_template`, which writes its own.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text)}.")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of token ids (e.g. a list, or a 1-D NumPy or JAX array of ints).

        Args:
          ids: token ids.
          skip_special_tokens: leave special tokens (``<|im_end|>``) out of the text.
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Renders a conversation with the model's chat template, as transformers does.

        Args:
          messages: dicts such as ``{"role": "user", "content": "Hi"}`` (keys whose value is
            None are dropped, as transformers drops them).
          add_generation_prompt: end with the prompt of the assistant's turn.
          **variables: more template variables (e.g. `tools`, `enable_thinking`).

        Returns:
          The rendered text; encode it with ``add_special_tokens=False``.

        Raises:
          ImportError: jinja2 is not installed.
          ValueError: the model has no chat template.
          TypeError: a message is not a mapping.
        """
        if self.chat_template is None:
            raise ValueError(
                "This tokenizer has no chat template (no tokenizer.chat_template in the GGUF "
                "file, no chat_template in tokenizer_config.json or chat_template.jinja); "
                "format the prompt yourself or set Tokenizer.chat_template."
            )
        _require(jinja2, "jinja2", "Tokenizer.apply_chat_template")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise TypeError(f"A chat message must be a mapping (role, content), got {m!r}.")
            chat.append({k: v for k, v in m.items() if v is not None})
        context = self.special_tokens | variables
        return _compile(self.chat_template).render(
            messages=chat, add_generation_prompt=add_generation_prompt, **context
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens}, "
            f"chat_template={'yes' if self.chat_template else 'none'})"
        )


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"Cannot parse '{file}' as JSON: {e}") from e


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a str or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _default_template(value: Any, directory: Path) -> str | None:
    """The config's chat template: a str, or a list of named templates ("default" is used)."""
    if value is None or isinstance(value, str):
        return value
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
    if "default" not in named:
        raise ValueError(
            f"tokenizer_config.json in '{directory}' has named chat templates {sorted(named)} "
            "but none named 'default'."
        )
    return named["default"]


def _bpe(tokens: list[str], merges: list[str], token_types: list[int] | None) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` of llama.cpp's vocabulary, its control tokens
    special and its user-defined tokens matched whole (as transformers reads GGUF files)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    types = list(token_types or ())
    control = [t for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL]
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend


def _pre_tokenizer(splits: tuple[str, ...], gpt2_split: bool) -> Any:
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_split))
    return pre_tokenizers.Sequence(steps)


def _set_post_processor(backend: Any, bos: str | None, eos: str | None) -> None:
    """What encode(add_special_tokens=True) adds: `bos` before and `eos` after (transformers'
    `update_post_processor`)."""
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join(
        [single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    )
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


if jinja2 is not None:

    class _GenerationTag(jinja2_ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' marker of the assistant's
        tokens, for training masks) renders its body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """A chat template compiled in transformers' sandboxed environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2_ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
