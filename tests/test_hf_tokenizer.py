"""Hugging Face export of the tokenizer (nanochat/hf_tokenizer.py): AutoTokenizer must give exactly our ids."""
from __future__ import annotations

import itertools
import json
import os
import random
import sys

import pytest

from nanochat.common import UserError
from nanochat.hf_tokenizer import (TOKENIZER_CONFIG_JSON, TOKENIZER_JSON, build_hf_tokenizer, bytes_to_unicode,
                                   check_hf_tokenizer, tokenizer_config, vocab_and_merges,
                                   write_hf_tokenizer)
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

try:
    import tokenizers  # noqa: F401
    import transformers
except ImportError:
    transformers = None


@pytest.fixture(scope="module", autouse=True)
def _hf_installed():
    """Skip without the [hf] extra; under CI (NANOCHAT_CI=1, as conftest.skip_or_fail) that is a failure."""
    if transformers is None:
        reason = "tokenizers/transformers are not installed (pip install -e '.[hf]')"
        if os.environ.get("NANOCHAT_CI") == "1":
            pytest.fail(f"{reason} -- required under CI (NANOCHAT_CI=1)")
        pytest.skip(reason)

# text that exercises every branch of the split pattern, and the places where regex engines tend to disagree
CASES = [
    "",
    "Hello world!",
    "日本語のテキストと中文字符。한국어 텍스트",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308 n\u0303 (NFD) vs é ä ñ (NFC), lone \u0301 mark",
    "RTL: שלום עולם, مرحبا بالعالم 123 \u200fmark\u200e",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\t\tand  double  spaces \t \t mixed",
    "windows\r\nline\r\nendings\r\n\r\n",
    "many newlines\n\n\n\n\n\n\nend\n",
    " \n \n\t\n",
    "numbers 1234567890123456789 3.14159 -42 1,000,000 ١٢٣٤٥ ²³ ⅷ",
    "I'LL DON'T you'd WE'RE they've she's I'm don't isn't 'tis ''quoted''",
    "punctuation!!! ...??? --- ((x)) <a href='x'>y</a> $$$ @#%",
    "hello <|bos|> world",
    "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>ok<|assistant_end|> <|python_start|>x<|output_end|>",
    "<|bos",
    "\x00\x01\x7f control \u2028 line sep \u00a0nbsp \u3000ideographic space",
]


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return tiny_base_dir.tokenizer


@pytest.fixture(scope="module")
def sample(tiny_base_dir) -> list[str]:
    """A few hundred real documents (held-out split, so not the tokenizer's training text) plus CASES."""
    from nanochat.dataset import iter_documents
    docs = list(itertools.islice(iter_documents("local", "val"), 300))
    assert len(docs) == 300
    return docs + CASES


@pytest.fixture(scope="module")
def export(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_tok")
    files = write_hf_tokenizer(tok, str(out), model_max_length=2048)
    return out, files


@pytest.fixture(scope="module")
def hf(export):
    return transformers.AutoTokenizer.from_pretrained(str(export[0]))


def hf_ids(hf_tok, texts: list[str]) -> list[list[int]]:
    return hf_tok(texts, add_special_tokens=False)["input_ids"]


def test_files_and_config(tok, export):
    out, files = export
    assert files == [TOKENIZER_JSON, TOKENIZER_CONFIG_JSON]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no temp files or extras left behind
    cfg = json.loads((out / TOKENIZER_CONFIG_JSON).read_text())
    assert cfg["bos_token"] == "<|bos|>" and cfg["add_bos_token"] is True and cfg["split_special_tokens"] is True
    assert cfg["additional_special_tokens"] == SPECIAL_TOKENS[1:]
    assert cfg["model_max_length"] == 2048
    assert "model_max_length" not in tokenizer_config(tok)  # only when asked for
    tj = json.loads((out / TOKENIZER_JSON).read_text())
    split, byte_level = tj["pre_tokenizer"]["pretokenizers"]
    # the possessive quantifiers go through unchanged: Oniguruma supports them (equivalence: the tests below)
    assert tok.pattern == SPLIT_PATTERN and split["pattern"] == {"Regex": SPLIT_PATTERN}
    assert split["behavior"] == "Isolated" and byte_level["use_regex"] is False
    assert byte_level["add_prefix_space"] is False
    assert tj["normalizer"] is None and tj["post_processor"]["type"] == "TemplateProcessing" and tj["decoder"]["type"] == "ByteLevel"
    assert tj["model"]["ignore_merges"] is True
    assert len(tj["model"]["vocab"]) == len(tok.mergeable_ranks)
    assert len(tj["model"]["merges"]) == len(tok.mergeable_ranks) - 256  # one merge per non-byte token
    assert [(t["content"], t["id"], t["special"]) for t in tj["added_tokens"]] == \
        [(s, tok.encode_special(s), True) for s in SPECIAL_TOKENS]


def test_autotokenizer_gives_our_ids(tok, hf, sample):
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert hf.split_special_tokens is True and hf.model_max_length == 2048
    ours = tok.encode_batch(sample)
    assert hf_ids(hf, sample) == ours  # batch path
    for text, ids in zip(CASES, ours[-len(CASES):]):  # single-text paths, with the default add_special_tokens
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == [tok.bos_token_id] + ids, text  # BOS first by default, as our prepend=
        assert hf.encode(text) == [tok.bos_token_id] + ids, text
    check_hf_tokenizer(tok, str(hf.name_or_path), sample)  # the exporter's own check agrees


def test_special_tokens(tok, hf):
    n_ranks = len(tok.mergeable_ranks)
    assert hf.bos_token == "<|bos|>" and hf.bos_token_id == tok.bos_token_id
    for s in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(s) == tok.encode_special(s), s
    assert len(hf) == tok.vocab_size
    assert set(hf.all_special_ids) == set(tok.special_tokens.values())
    # transformers 5 renamed additional_special_tokens to extra_special_tokens (and converts the old key on load)
    assert (getattr(hf, "extra_special_tokens", None) or hf.additional_special_tokens) == SPECIAL_TOKENS[1:]
    # a special-token string typed in text is text: same ids as ours, none of them special
    for text in ["hello <|bos|> world", CASES[16], "<|assistant_end|>"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text) and max(ids) < n_ranks, text
        assert hf(text)["input_ids"] == [tok.bos_token_id] + ids  # the only special: the BOS the tokenizer adds
        assert hf.tokenize(text) == [hf.convert_ids_to_tokens(i) for i in ids]
    # special ids decode to their strings, as ours do
    ids = [tok.bos_token_id] + tok.encode("hi there") + [tok.encode_special("<|assistant_end|>")]
    assert hf.decode(ids) == tok.decode(ids) == "<|bos|>hi there<|assistant_end|>"
    assert hf.decode(ids, skip_special_tokens=True) == "hi there"


def test_decode_round_trip(tok, hf, sample):
    for text, ids in zip(sample, hf_ids(hf, sample)):
        assert hf.decode(ids) == text == tok.decode(ids)


def test_resaved_by_transformers_still_matches(tok, hf, sample, tmp_path):
    """A user who re-saves (or pushes) the loaded tokenizer keeps the behaviour: split_special_tokens survives."""
    hf.save_pretrained(str(tmp_path))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.split_special_tokens is True and again.bos_token_id == tok.bos_token_id
    assert hf_ids(again, sample) == tok.encode_batch(sample)


def _codepoint_texts(stride_astral: int) -> list[str]:
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and (c < 0x10000 or c % stride_astral == 0)]
    # contexts: inside a word, after a space/newline, doubled, before digits and a contraction
    return ["".join(ctx.replace("{}", c) for c in chars) for ctx in ("a{}b", " {}{}1", "\n{}'s ")]


def test_every_bmp_codepoint_splits_like_tiktoken(tok, hf):
    """Oniguruma (tokenizers) and fancy-regex (tiktoken) must agree on \\p{L}, \\p{N}, \\s for every character: all
    of the BMP and a sample of the other planes (the slow test below covers every code point)."""
    texts = _codepoint_texts(stride_astral=61)
    assert hf_ids(hf, texts) == tok.encode_batch(texts)


@pytest.mark.slow
def test_every_codepoint_splits_like_tiktoken(tok, hf):
    texts = _codepoint_texts(stride_astral=1)
    for text in texts:
        assert hf_ids(hf, [text])[0] == tok.encode(text)


def test_merges_reproduce_tiktoken_bpe(tok):
    """Below the split pattern: HF BPE with our merges equals tiktoken's BPE on every token and on random
    concatenations of tokens (where a wrong or missing merge shows even if whole tokens are looked up directly)."""
    model = build_hf_tokenizer(tok).model
    b2u = bytes_to_unicode()
    tokens = sorted(tok.mergeable_ranks, key=tok.mergeable_ranks.get)
    rng = random.Random(0)
    pieces = tokens + [b"".join(rng.choices(tokens, k=rng.randint(2, 5))) for _ in range(3000)]
    for piece in pieces:
        got = [t.id for t in model.tokenize("".join(b2u[b] for b in piece))]
        # tiktoken's BPE of one pre-token (whole-token lookup first, as ignore_merges does); private in tiktoken 0.14
        assert got == tok.enc._encode_single_piece(piece), piece


def test_vocab_and_merges_unit():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode
    assert bytes_to_unicode() == hf_bytes_to_unicode()  # the alphabet ByteLevel (de)coding assumes
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b" a": 257, b"abc": 258, b" abc": 259})
    vocab, merges = vocab_and_merges(ranks)
    assert vocab["\u0120abc"] == 259 and vocab["a"] == ord("a") and len(vocab) == 260  # \u0120 = GPT-2's space
    # a token's merge is where BPE with lower ranks stops: " abc" is " " + "abc", not " a" + ..., because BPE takes
    # "ab" (rank 256) before " a" (rank 257)
    assert merges == [("a", "b"), ("\u0120", "a"), ("ab", "c"), ("\u0120", "abc")]
    ranks[b"xyz"] = 260  # not the merge of two lower-ranked tokens: no HF BPE can produce it
    with pytest.raises(UserError, match=r"b'xyz' \(rank 260\) is not a merge of two lower-ranked tokens"):
        vocab_and_merges(ranks)


def _save_mutant(tok, out, mutate_tk=None, mutate_json=None, mutate_cfg=None):
    tk = build_hf_tokenizer(tok)
    if mutate_tk:
        mutate_tk(tk)
    tj = json.loads(tk.to_str())
    if mutate_json:
        mutate_json(tj)
    cfg = tokenizer_config(tok)
    if mutate_cfg:
        mutate_cfg(cfg)
    out.mkdir()
    (out / TOKENIZER_JSON).write_text(json.dumps(tj))
    (out / TOKENIZER_CONFIG_JSON).write_text(json.dumps(cfg))
    return transformers.AutoTokenizer.from_pretrained(str(out))


def test_mutated_exports_are_caught(tok, sample, tmp_path):
    """The comparison above has teeth: each plausible export mistake changes ids on the sample."""
    from tokenizers import Regex, pre_tokenizers
    ours = tok.encode_batch(sample)

    def pattern(p):
        def set_pattern(tk):
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(p), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return set_pattern

    def drop_merge(tj):  # the first merge (rank 256): the most frequent pair in the training text
        del tj["model"]["merges"][0]

    def reverse_merges(tj):  # merge priority must follow the ranks
        tj["model"]["merges"].reverse()

    mutants = {
        "digits not grouped by 1-2": dict(mutate_tk=pattern(SPLIT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}+"))),
        "digits grouped by 1-3": dict(mutate_tk=pattern(SPLIT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}"))),
        "case-sensitive contractions": dict(mutate_tk=pattern(SPLIT_PATTERN.replace("(?i:", "(?:"))),
        "dropped merge": dict(mutate_json=drop_merge),
        "merges out of rank order": dict(mutate_json=reverse_merges),
        "special strings parsed": dict(mutate_cfg=lambda cfg: cfg.update(split_special_tokens=False)),
    }
    for i, (name, kw) in enumerate(mutants.items()):
        bad = _save_mutant(tok, tmp_path / f"m{i}", **kw)
        assert hf_ids(bad, sample) != ours, name
        with pytest.raises(UserError, match="encodes differently"):
            check_hf_tokenizer(tok, str(tmp_path / f"m{i}"), sample)
    # and the unmutated save path passes the same comparison
    good = _save_mutant(tok, tmp_path / "good")
    assert hf_ids(good, sample) == ours


@pytest.mark.parametrize("module", ["tokenizers", "transformers"])
def test_missing_dependency_is_a_clear_error(tok, tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(UserError) as e:
        if module == "tokenizers":
            write_hf_tokenizer(tok, str(tmp_path / "out"))
        else:
            check_hf_tokenizer(tok, str(tmp_path / "out"), ["x"])
    msg = str(e.value)
    assert f"`{module}`" in msg and "pip install -e '.[hf]'" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # nothing half-written
