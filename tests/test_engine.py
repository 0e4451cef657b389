"""Generation engine: the KV cache reproduces full-forward decoding (baseline and mHC), batching with left padding
reproduces prompt-by-prompt generation, stop tokens/strings, seeded sampling."""
from __future__ import annotations

import json

import pytest
import torch

from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, GPTConfig
from nanochat.mhc import MHCConfig

VOCAB = 256


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make_model(mhc: bool, n_kv_head: int = 4, seed: int = 0) -> GPT:
    """A small fp32 model whose logits are O(1) and whose attention matters: the default init has a tiny lm_head
    and near-zero output projections, which would make cache bugs nearly invisible."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                    out_proj_init_scale=1.0, mhc=MHCConfig(enabled=mhc, num_streams=4))
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # std 0.001 -> 0.3: logits up to ~7
    return model.eval()


def naive_greedy(model, prompt: list[int], n: int):
    """The reference: recompute the whole sequence with a plain forward (no cache object at all) per token."""
    ids, tokens, logits = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(ids)[0, -1]
            logits.append(last)
            tokens.append(int(last.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, logits


CASES = [pytest.param(False, 4, id="baseline"), pytest.param(False, 2, id="baseline-gqa"),
         pytest.param(True, 4, id="mhc")]


@pytest.mark.parametrize("mhc, n_kv_head", CASES)
def test_kv_cache_equals_full_forward(mhc, n_kv_head):
    model = make_model(mhc, n_kv_head)
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_tokens, ref_logits = naive_greedy(model, prompt, 40)  # 47 positions: past the 32-token training context
    engine = Engine(model)
    for use_cache in (True, False):
        out = engine.generate([prompt], max_new_tokens=40, use_cache=use_cache, return_logits=True)[0]
        assert out.tokens == ref_tokens and out.finish_reason == "length"
        assert len(out.logits) == 40
        for step, (a, b) in enumerate(zip(out.logits, ref_logits)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"use_cache={use_cache} step {step}")
    assert len(set(ref_tokens)) > 3  # the check is not vacuous: the model does not just repeat one token


@pytest.mark.parametrize("mhc, n_kv_head", CASES)
def test_batched_equals_prompt_by_prompt(mhc, n_kv_head):
    model = make_model(mhc, n_kv_head)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    engine = Engine(model)
    batched = engine.generate(prompts, max_new_tokens=20, return_logits=True)
    for p, out in zip(prompts, batched):
        single = engine.generate([p], max_new_tokens=20, return_logits=True)[0]
        assert out.tokens == single.tokens
        for a, b in zip(out.logits, single.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the no-cache path pads the same way
    nocache = engine.generate(prompts, max_new_tokens=20, use_cache=False)
    assert [o.tokens for o in nocache] == [o.tokens for o in batched]


class CharTokenizer:
    """Stub: token t decodes to one character, so stop strings can be placed exactly."""

    def decode(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_tokens_and_stop_strings():
    model = make_model(False)
    engine = Engine(model, CharTokenizer())
    prompt = [5, 6, 7]
    free = engine.generate([prompt], max_new_tokens=12)[0]
    assert free.finish_reason == "length" and len(free.tokens) == 12
    # stop token: the first occurrence of generated token #3 ends the row, and is not included
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    out = engine.generate([prompt], max_new_tokens=12, stop_tokens=[stop])[0]
    assert out.tokens == free.tokens[:first] and out.finish_reason == "stop_token"
    # stop string: the text of tokens 4..5; the text is cut before it, the tokens run up to its end
    text = CharTokenizer().decode(free.tokens)
    s = text[4:6]
    at = text.find(s)
    out = engine.generate([prompt], max_new_tokens=12, stop_strings=[s, "this never occurs"])[0]
    assert out.finish_reason == "stop_string" and out.text == text[:at] and out.tokens == free.tokens[:at + 2]
    # rows finish independently in a batch: the other row runs to its length limit
    two = engine.generate([prompt, [9, 9]], max_new_tokens=12, stop_tokens=[stop])
    assert two[0].tokens == free.tokens[:first] and two[0].finish_reason == "stop_token"  # as alone, above
    assert two[1].tokens == engine.generate([[9, 9]], max_new_tokens=12, stop_tokens=[stop])[0].tokens


def test_seeded_sampling():
    model = make_model(False)
    engine = Engine(model)
    prompts = [[1, 2, 3], [4, 5]]
    a = engine.generate(prompts, 24, temperature=1.0, seed=123)
    b = engine.generate(prompts, 24, temperature=1.0, seed=123)
    c = engine.generate(prompts, 24, temperature=1.0, seed=124)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]
    greedy = engine.generate(prompts, 24)
    top1 = engine.generate(prompts, 24, temperature=0.7, top_k=1, seed=5)
    assert [o.tokens for o in top1] == [o.tokens for o in greedy]
    # top_k = 3: every sampled token is among the 3 most likely at its step
    out = engine.generate([prompts[0]], 24, temperature=2.0, top_k=3, seed=7, return_logits=True)[0]
    for tok, logits in zip(out.tokens, out.logits):
        assert tok in torch.topk(logits, 3).indices.tolist()


def test_bad_arguments():
    engine = Engine(make_model(False))
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        engine.generate([[1] * 100], max_new_tokens=29)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.generate([[1]], max_new_tokens=2, stop_strings=["x"])
    cache = KVCache(1, 2, 4)
    with pytest.raises(ValueError, match="overflow"):
        cache.insert_kv(0, torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))


def test_inference_benchmark_writes_json(tmp_path):
    """The benchmark runs end to end and writes its figures (no timing assertions: figures are measured)."""
    from benchmarks import inference
    out = tmp_path / "inf.json"
    inference.main(["--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "16", "--vocab-size",
                    "300", "--prompt-len", "6", "--new-tokens", "5", "--batch-sizes", "1", "--repeats", "1",
                    "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    import statistics
    for name in ("baseline", "mhc"):
        b1 = results[name]["batch"]["1"]
        assert b1["prefill_ms"] == pytest.approx(1000 * statistics.median(b1["prefill_s_all"]))
        assert b1["decode_tok_per_s"] == pytest.approx(5 / statistics.median(b1["decode_s_all"]))  # 5 new tokens
        assert b1["decode_ms_per_step"] == pytest.approx(1000 / b1["decode_tok_per_s"])
        assert results[name]["peak_memory_mib"]["1"] > 50  # a python process with torch loaded
        g = results[name]["generate_batch1"]
        assert g["cache_speedup"] == pytest.approx(g["tok_per_s_cache"] / g["tok_per_s_no_cache"])
    assert results["mhc"]["num_params"] > results["baseline"]["num_params"]
    assert set(results["ratios"]) == {"decode_tok_per_s_mhc_over_baseline_b1", "peak_memory_mhc_over_baseline_b1"}


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_kv_cache_holds_bf16_keys_and_values_under_autocast(mhc):
    """Under bf16 autocast the projections are bf16, and so are the rotated, normalised keys: the cache holds K
    and V in bf16 (the fp32 rotary tables used to promote K to fp32: twice the memory, and a cast of the whole
    prefix at every decode step)."""
    model = make_model(mhc)
    cache = KVCache(2, model.config.n_layer, 12)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, kv_cache=cache)
        model(ids[:, :1], kv_cache=cache)  # one decode step
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert cache.get_pos() == 9


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_last_only_logits_are_the_last_position_of_the_full_forward(mhc):
    """Generation asks for the last position's logits only (no [B, T, V] fp32 tensor for a long prompt)."""
    model = make_model(mhc)
    ids = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (3, 1, VOCAB) and last.dtype == torch.float32
    assert torch.allclose(last, full[:, -1:], atol=1e-5)
