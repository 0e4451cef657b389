"""Tokenizer: round trips, special tokens, save/load without pickle, byte counts, error messages."""
from __future__ import annotations

import json
import pickle

import pytest

from nanochat.common import UserError
from nanochat.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, get_tokenizer

ROUND_TRIP = [
    "",
    "Hello world!",
    "ünïcödé façade naïve",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦",
    "日本語のテキストと中文字符",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    inner\t\tspaces\n\n\n  and newlines ",
    "windows\r\nline\r\nendings\r\n",
    "numbers 1234567 3.14159 -42",
    "<|bos|> looks special but is plain text <|assistant_end|>",
]


@pytest.fixture(scope="module")
def tok(tiny_base_dir) -> Tokenizer:
    return tiny_base_dir.tokenizer


def test_round_trip(tok):
    for s in ROUND_TRIP:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, s
    assert tok.encode("") == []


def test_special_tokens(tok):
    assert tok.vocab_size == 1024
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(tok.vocab_size - len(SPECIAL_TOKENS), tok.vocab_size))
    assert tok.bos_token_id == tok.encode_special("<|bos|>")
    # a special-token string inside user text stays plain text
    plain = tok.encode("<|bos|>hi")
    assert tok.bos_token_id not in plain
    assert tok.decode(plain) == "<|bos|>hi"
    # prepend by id or by name
    assert tok.encode("hi", prepend="<|bos|>") == [tok.bos_token_id] + tok.encode("hi")
    assert tok.encode("hi", prepend=tok.bos_token_id)[0] == tok.bos_token_id
    batch = tok.encode_batch(["a b", "c"], prepend="<|bos|>")
    assert [b[0] for b in batch] == [tok.bos_token_id] * 2
    assert batch == [tok.encode("a b", prepend="<|bos|>"), tok.encode("c", prepend="<|bos|>")]
    with pytest.raises(UserError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_save_load_identical(tok, tmp_path, monkeypatch):
    tok.save(tmp_path)
    with open(tmp_path / "tokenizer.json") as f:
        json.load(f)  # valid JSON, not a pickle

    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading the tokenizer")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    tok2 = Tokenizer.load(tmp_path)
    monkeypatch.undo()
    assert tok2.vocab_size == tok.vocab_size and tok2.fingerprint == tok.fingerprint
    assert tok2.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)
    assert tok2.token_bytes().tolist() == tok.token_bytes().tolist()


def test_get_tokenizer_uses_base_dir(tiny_base_dir):
    assert get_tokenizer().fingerprint == tiny_base_dir.tokenizer.fingerprint


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype.is_floating_point is False and tb.shape == (tok.vocab_size,)
    assert all(tb[tok.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
    assert (tb[:256] == 1).all()  # the byte-level base tokens
    for s in ROUND_TRIP:
        ids = tok.encode(s, prepend="<|bos|>")  # BOS counts 0 bytes
        assert int(tb[ids].sum()) == len(s.encode("utf-8")), s


def test_vocab_too_small():
    with pytest.raises(UserError, match="--vocab-size"):
        Tokenizer.train(iter(["some text"]), MIN_VOCAB_SIZE - 1)


def test_train_small_corpus():
    tok = Tokenizer.train(iter(["hello hello hello world"] * 50), 270)  # this text allows 10 merges at most
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert len(tok.encode("hello")) < len("hello")  # merges were learned


def test_corrupted_or_missing_files(tok, tmp_path):
    with pytest.raises(UserError, match="tok_train"):
        Tokenizer.load(tmp_path / "missing")
    tok.save(tmp_path)
    path = tmp_path / "tokenizer.json"
    good = path.read_text()
    for bad in ("{not json", json.dumps({"format": "nanochat-tiktoken-v1"}), good.replace('"format"', '"fmt"'),
                good[: len(good) // 2]):
        path.write_text(bad)
        with pytest.raises(UserError, match="tokenizer.json"):
            Tokenizer.load(tmp_path)
    path.write_text(good)
    (tmp_path / "token_bytes.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match="token_bytes.npy"):
        Tokenizer.load(tmp_path)
