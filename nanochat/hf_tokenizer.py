r"""Export our tokenizer as a Hugging Face `tokenizers` tokenizer.json + tokenizer_config.json.

`transformers.AutoTokenizer.from_pretrained(out_dir)` then gives exactly our ids: `tok(text,
add_special_tokens=False)["input_ids"] == Tokenizer.encode(text)`, and with the default add_special_tokens=True
BOS comes first, `== Tokenizer.encode(text, prepend=bos)`: every training document starts with BOS, so a model
reads text that way (as Llama's tokenizer adds its BOS; lm-eval's `hf` model with add_bos_token=True relies on it).

How the tiktoken Encoding (nanochat/tokenizer.py) maps onto `tokenizers` objects:
- model: `models.BPE(vocab, merges, ignore_merges=True)`.
  * vocab: every mergeable token, its bytes spelled with GPT-2's `bytes_to_unicode` alphabet (the byte-level
    convention: one printable character per byte), id = its tiktoken rank.
  * merges: tiktoken keeps no merge list, only ranks, and merges the adjacent pair whose concatenation has the lowest
    rank. For each multi-byte token we run that same BPE on its bytes using only lower ranks: it stops at exactly the
    two parts the token was made from (as rustbpe trained it), and that pair becomes the token's merge. Merges are
    listed in rank order, so HF's merge priority equals tiktoken's rank order.
  * ignore_merges=True: tiktoken looks a whole pre-token up in the vocab before running BPE; this is the HF switch for
    the same shortcut.
- pre_tokenizer: `Sequence[Split(Regex(SPLIT_PATTERN), "isolated"), ByteLevel(add_prefix_space=False,
  use_regex=False)]`: our split pattern (Oniguruma accepts its possessive quantifiers `?+` and `++` unchanged), then
  bytes -> unicode characters without GPT-2's own regex.
- decoder: `decoders.ByteLevel()` (unicode characters -> bytes -> UTF-8).
- no normalizer; the post-processor `TemplateProcessing("<|bos|> $A")` adds BOS when add_special_tokens is on (the
  default), as our `prepend=` does; `add_bos_token: true` says so in tokenizer_config.json (transformers 5.23 reads
  the post-processor, not the flag).
- special tokens: added tokens (special=True, normalized=False) with the ids right after the ranks, as in
  `Tokenizer.train`. `tokenizer_config.json` sets `split_special_tokens: true`, so a special-token string typed inside
  ordinary text is encoded as plain text, as our `encode` (encode_ordinary) does; special ids come only from
  `convert_tokens_to_ids` / `bos_token_id`. transformers copies that flag onto the backend's `encode_special_tokens`;
  tokenizer.json cannot store it, so a bare `tokenizers.Tokenizer.from_file(...)` user must set
  `tk.encode_special_tokens = True` to get the same behaviour.
- `tokenizer_class: "PreTrainedTokenizerFast"`: in transformers 5 it is an alias of `TokenizersBackend` (the generic
  tokenizer.json backend, which is what its own save_pretrained writes); transformers 4 knows only the old name.
  Likewise `additional_special_tokens` (transformers 5 reads it as `extra_special_tokens`). The bos token is named in
  tokenizer_config.json, so no special_tokens_map.json is needed.
- Checked by tests/test_hf_tokenizer.py: same ids on real documents and hard cases, on every Unicode code point in
  several contexts (Oniguruma and tiktoken's regex agree on \p{L}, \p{N}, \s), and HF BPE equals tiktoken's BPE on
  every token and on random token concatenations. `check_hf_tokenizer` repeats the id check after an export.
"""
from __future__ import annotations

import json
import os

from nanochat.common import UserError, atomic_write_text

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
INSTALL_HINT = "pip install -e '.[hf]'"


def _require(module: str):
    """Import an optional dependency, or a one-line UserError saying which extra to install."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"exporting to Hugging Face needs the `{module}` package, which is not installed: "
                        f"install the [hf] extra ({INSTALL_HINT})") from None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer and decoder assume)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes go to 256+n, keeping every character printable and distinct
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token` using only ranks below max_rank: always merge the pair of lowest rank (leftmost on a
    tie). For a token of rank max_rank this stops at the two parts it was merged from."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def vocab_and_merges(mergeable_ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The HF byte-level BPE vocab (token string -> id) and merges (in priority order) equivalent to tiktoken ranks."""
    b2u = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = rank
        if len(token) == 1:
            continue
        parts = _bpe_parts(mergeable_ranks, token, rank)
        if len(parts) != 2:  # no single merge of lower-ranked tokens makes it: HF BPE could never produce it
            raise UserError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens (BPE with lower "
                            f"ranks gives {len(parts)} parts), so it has no Hugging Face BPE equivalent")
        merges.append((spell(parts[0]), spell(parts[1])))
    return vocab, merges


def build_hf_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` equivalent to our Tokenizer (a nanochat.tokenizer.Tokenizer)."""
    _require("tokenizers")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = vocab_and_merges(tokenizer.mergeable_ranks)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                              ignore_merges=True))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    # added tokens take the next free ids in order; ours are numbered right after the ranks, so they line up
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                      single_word=False) for s, _ in specials])
    for s, i in specials:
        if tk.token_to_id(s) != i:
            raise UserError(f"special token {s!r} got id {tk.token_to_id(s)} in the Hugging Face tokenizer, expected "
                            f"{i}: special ids must follow the {len(vocab)} ranks")
    bos = ("<|bos|>", tokenizer.bos_token_id)
    # BOS first with add_special_tokens (the default), as every training document starts; nothing added without it
    tk.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1",
                                                      special_tokens=[bos])
    tk.encode_special_tokens = True  # not serialised; see split_special_tokens in tokenizer_config.json
    return tk


def tokenizer_config(tokenizer, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json content. A plain dict rather than transformers' save_pretrained: that would need
    transformers at export time and writes version-specific keys (5.x writes tokenizer_class "TokenizersBackend",
    which 4.x cannot resolve)."""
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    cfg = {
        "tokenizer_class": TOKENIZER_CLASS,
        "bos_token": "<|bos|>",
        "eos_token": "<|bos|>",  # a document ends where the next begins (a chat turn at <|assistant_end|>)
        "pad_token": "<|bos|>",  # batches are padded with BOS under an attention mask (the model config's pad id)
        "additional_special_tokens": [s for s, _ in specials if s != "<|bos|>"],
        # BOS first with add_special_tokens, as training packs documents (the post-processor does it)
        "add_bos_token": True,
        "add_eos_token": False,
        # a special-token string inside text is text, exactly like Tokenizer.encode (encode_ordinary)
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for s, i in specials},
    }
    if model_max_length is not None:
        cfg["model_max_length"] = int(model_max_length)
    return cfg


def write_hf_tokenizer(tokenizer, out_dir: str, model_max_length: int | None = None) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into out_dir (atomically); return the file names written."""
    tk = build_hf_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    files = {TOKENIZER_JSON: tk.to_str(),
             TOKENIZER_CONFIG_JSON: json.dumps(tokenizer_config(tokenizer, model_max_length), indent=2) + "\n"}
    for name, text in files.items():
        atomic_write_text(os.path.join(out_dir, name), text)
    return list(files)


def check_hf_tokenizer(tokenizer, out_dir: str, texts: list[str]) -> None:
    """Load out_dir with transformers.AutoTokenizer and raise a UserError unless it encodes `texts` to our ids,
    decodes them back and has our special ids (run it after `write_hf_tokenizer` on a sample of real text)."""
    _require("transformers")
    from transformers import AutoTokenizer

    # trust_remote_code: AutoTokenizer reads config.json first, and an mHC export's config is our own code
    hf = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
    for s, i in tokenizer.special_tokens.items():
        if hf.convert_tokens_to_ids(s) != i:
            raise UserError(f"{out_dir}: special token {s!r} has id {hf.convert_tokens_to_ids(s)}, ours is {i}")
    if hf.bos_token_id != tokenizer.bos_token_id:
        raise UserError(f"{out_dir}: bos_token_id is {hf.bos_token_id}, ours is {tokenizer.bos_token_id}")
    for n, text in enumerate(texts):
        ours, theirs = tokenizer.encode(text), hf(text, add_special_tokens=False)["input_ids"]
        if hf(text)["input_ids"] != [tokenizer.bos_token_id] + theirs:
            raise UserError(f"{out_dir}: text {n} ({text[:40]!r}...) does not get BOS first with add_special_tokens")
        if theirs != ours:
            k = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise UserError(f"{out_dir}: text {n} ({text[:40]!r}...) encodes differently from token {k} on: ours "
                            f"{ours[k:k + 8]}, Hugging Face {theirs[k:k + 8]}")
        if hf.decode(theirs) != text:
            raise UserError(f"{out_dir}: text {n} ({text[:40]!r}...) does not decode back to itself")
