"""Generation engine: the KV cache reproduces full-forward decoding (baseline and mHC), batching with left padding
reproduces prompt-by-prompt generation, stop tokens/strings, seeded sampling."""
from __future__ import annotations

import json

import pytest
import torch

from nanochat.common import UserError
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
    """The benchmark runs end to end, eager and compiled (aot_eager: the compiled path's graphs, quickly), and writes
    its figures in the documented shape (no timing assertions: figures are measured). One batch size of 3 (a
    padded bucket of 4 on the compiled path) keeps it to two memory child processes."""
    from benchmarks import inference
    out = tmp_path / "inf.json"
    inference.main(["--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "16", "--vocab-size",
                    "300", "--prompt-len", "6", "--new-tokens", "5", "--batch-sizes", "3", "--repeats", "1",
                    "--compile", "both", "--compile-backend", "aot_eager", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    import statistics
    for name in ("baseline", "mhc"):
        b3 = results[name]["batch"]["3"]
        assert b3["mode"] == "eager"
        assert b3["prefill_ms"] == pytest.approx(1000 * statistics.median(b3["prefill_s_all"]))
        assert b3["decode_tok_per_s"] == pytest.approx(3 / statistics.median(b3["decode_s_per_forward_all"]))
        assert b3["decode_ms_per_step"] == pytest.approx(3000 / b3["decode_tok_per_s"])
        assert results["decode"][name]["eager"]["3"] == pytest.approx(b3["decode_tok_per_s"])
        assert results["prefill"][name]["eager"]["3"] == pytest.approx(b3["prefill_ms"])
        for table in ("decode", "prefill"):
            assert set(results[table][name]) == {"eager", "compiled"}
            assert set(results[table][name]["compiled"]) == {"3"}
        assert set(results["compile_s"][name]) == {"3"}
        assert results[name]["peak_memory_mib"]["3"] > 50  # a python process with torch loaded
        g = results[name]["generate_batch1"]
        assert g["cache_speedup"] == pytest.approx(g["tok_per_s_cache"] / g["tok_per_s_no_cache"])
    assert results["mhc"]["num_params"] > results["baseline"]["num_params"]
    r = results["ratios"]
    assert r["decode_mhc_over_baseline_compiled_b3"] == pytest.approx(
        results["decode"]["mhc"]["compiled"]["3"] / results["decode"]["baseline"]["compiled"]["3"])
    assert r["decode_compiled_over_eager_mhc_b3"] == pytest.approx(
        results["decode"]["mhc"]["compiled"]["3"] / results["decode"]["mhc"]["eager"]["3"])
    assert len(r) == 2 + 2 + 1  # arch ratio per mode, compiled/eager per arch, memory


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


# -- the compiled decode (Engine(compile=True)) --------------------------------------------------------------------
# aot_eager traces exactly what inductor would compile (Dynamo + AOT autograd, the static cache, the bucketing, the
# per-row gates) without inductor's minutes of C++ compile; the inductor run is the slow test below.

def compiled_vs_eager(model, prompts, n, tokenizer=None, **kw):
    eager = Engine(model, tokenizer).generate(prompts, n, return_logits=True, **kw)
    compiled = Engine(model, tokenizer, compile=True, backend="aot_eager").generate(prompts, n, return_logits=True,
                                                                                      **kw)
    return eager, compiled


def assert_same_generations(eager, compiled, atol=1e-5):
    assert [o.tokens for o in compiled] == [o.tokens for o in eager]
    assert [(o.text, o.finish_reason) for o in compiled] == [(o.text, o.finish_reason) for o in eager]
    for e, c in zip(eager, compiled):
        assert len(e.logits) == len(c.logits)
        for a, b in zip(c.logits, e.logits):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("mhc, n_kv_head", CASES)
def test_compiled_decode_equals_eager(mhc, n_kv_head):
    """Greedy tokens and logits of the compiled path equal the eager path's: left padding (prompts of 3, 11, 6 and
    1 tokens), a batch padded to its bucket (3 rows -> 4), generation past the training context (32)."""
    model = make_model(mhc, n_kv_head)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 6)]
    eager, compiled = compiled_vs_eager(model, prompts, 30)
    assert_same_generations(eager, compiled)
    assert len({t for o in eager for t in o.tokens}) > 5  # not one repeated token
    # sampling draws the same tokens from the same seed (the padding rows never reach the sampler)
    eager, compiled = compiled_vs_eager(model, prompts, 12, temperature=1.0, seed=3)
    assert_same_generations(eager, compiled)


def test_compiled_decode_with_per_example_gates_and_stops():
    """mHC with a different gate vector per row (and the learned gates restored afterwards), stop tokens and stop
    strings: the compiled path ends each row where the eager one does."""
    model = make_model(True)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 9)]
    learned = model.mhc_gate_tensor()
    model.set_mhc_gates_per_layer(torch.tensor([[0.0, 1.0], [0.5, 0.2], [1.0, 0.0]]))
    free = Engine(model, CharTokenizer()).generate(prompts, 16)
    stop_tok = free[0].tokens[5]
    stop_str = CharTokenizer().decode(free[1].tokens)[3:5]
    eager, compiled = compiled_vs_eager(model, prompts, 16, CharTokenizer(), stop_tokens=[stop_tok],
                                        stop_strings=[stop_str])
    assert_same_generations(eager, compiled)
    assert {o.finish_reason for o in eager} >= {"stop_token", "stop_string"}
    # the per-row gates matter (rows alone under other gates decode differently) and were put back as they were
    assert model.mhc_gate_tensor().shape == (3, 4)
    model.clear_mhc_gates()
    assert torch.equal(model.mhc_gate_tensor(), learned)
    other = Engine(model, CharTokenizer()).generate(prompts, 16)
    assert [o.tokens for o in other] != [o.tokens for o in free]
    model.set_mhc_gate(torch.tensor([0.5, 0.5]))  # two per-example gates for three rows: named, as eager names it
    for compile in (False, True):
        with pytest.raises(UserError, match="2 gates set for a batch of 3 rows"):
            Engine(model, compile=compile, backend="aot_eager").generate(prompts, 4)
    model.clear_mhc_gates()


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_compiled_decode_does_not_recompile_after_warm_up(mhc):
    """One graph per (batch bucket, length bucket): after a warm-up call, other positions (prompt lengths, number of
    new tokens), batch sizes within the bucket and every kind of gate setting reuse it. With compile_prefill the
    prompt's length bucket is a graph too, and lengths within it reuse it."""
    from torch._dynamo.testing import CompileCounter
    model = make_model(mhc)
    counter = CompileCounter()
    engine = Engine(model, compile=True, compile_prefill=True, backend=counter)
    g = torch.Generator().manual_seed(5)

    def prompts(*lens):
        return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]

    engine.generate(prompts(9, 16, 12), 20)          # batch bucket 4, prompt bucket 16, cache 64: prefill + decode
    assert counter.frame_count == 2
    engine.generate(prompts(10, 13, 11, 15), 33)     # 4 rows, other lengths, more steps: the same bucket
    engine.generate(prompts(16, 9, 14), 7)
    if mhc:
        for setter, value in ((model.set_mhc_gate, 0.3), (model.set_mhc_gate, torch.tensor([0.1, 0.9, 0.5])),
                              (model.set_mhc_gates_per_layer, [0.2, 0.8]),
                              (model.set_mhc_gates_per_sublayer, torch.rand(3, 4))):
            setter(value)
            engine.generate(prompts(11, 12, 13), 9)
        model.clear_mhc_gates()
    assert counter.frame_count == 2, "a recompile after warm-up"
    engine.generate(prompts(5, 6), 9)                # batch bucket 2, prompt bucket 8: two new graphs, no more
    engine.generate(prompts(7, 8), 25)
    assert counter.frame_count == 4


def test_compiled_prefill_buckets_equal_eager():
    """compile_prefill left-pads the prompts to a power-of-two length: extra padding, the same tokens and logits."""
    model = make_model(True)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 3)]
    eager = Engine(model).generate(prompts, 20, return_logits=True)
    bucketed = Engine(model, compile=True, compile_prefill=True, backend="aot_eager").generate(prompts, 20,
                                                                                                return_logits=True)
    assert_same_generations(eager, bucketed)


def test_static_cache_protocol_and_errors():
    """The static cache: the prefill writes slots [0, T), decode steps advance a tensor position; an overflow and a
    missing shape are named; compile_prefill without compile is refused."""
    model = make_model(False)
    cache = KVCache(2, model.config.n_layer, 16, [0, 3], static=True, num_kv_heads=4, head_dim=16,
                    dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        model(ids, kv_cache=cache)
        model(ids[:, :1], kv_cache=cache)
        model(ids[:, :1], kv_cache=cache)
    assert cache.get_pos() == 8
    assert all(k[:, :, 8:].abs().sum() == 0 and k[:, :, 7].abs().sum() > 0 for k in cache.k)  # slots 0..7 written
    cache.reset([1, 0])
    assert cache.get_pos() == 0 and cache.pad_t.tolist() == [1, 0]
    with pytest.raises(ValueError, match="overflow: 17 positions > max_len 16"):
        model(torch.zeros(2, 17, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="needs num_kv_heads and head_dim"):
        KVCache(1, 2, 4, static=True)
    with pytest.raises(ValueError, match="compile_prefill needs compile"):
        Engine(model, compile_prefill=True)


@pytest.mark.slow
@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_inductor_compiled_decode_equals_eager(mhc, tmp_path, monkeypatch):
    """The real compiler (inductor's C++ on the CPU): greedy tokens equal eager's, logits within fp32 tolerance."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = make_model(mhc)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 6)]
    eager = Engine(model).generate(prompts, 24, return_logits=True)
    compiled = Engine(model, compile=True).generate(prompts, 24, return_logits=True)
    assert_same_generations(eager, compiled, atol=1e-4)
