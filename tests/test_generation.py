import io
import math
import os
import signal
import sys

import pytest
import torch
from transformers import AutoTokenizer

from minimind.commands.main import main as cli_main
from minimind.inference import decoding
from minimind.inference.chat import ReplyFormatter, trim_history
from minimind.inference.decoding import TextStream, decode, generate, stream_text
from minimind.inference.prepared import PreparedModel, prepare
from minimind.inference.sampling import NUCLEUS_CANDIDATES, greedy_tokens, nucleus_mask, pick_next_token
from minimind.inference.threads import ThreadPolicy
from minimind.inference import weights
from minimind.inference.weights import Int8Linear, LinearWeights, quantize_int8, quantize_linears, quantize_rows
from minimind.model.config import MiniMindConfig
from minimind.model.model import KVCache, MiniMindForCausalLM

from .conftest import MINIMIND2_TOKENIZER, memorize


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return MiniMindForCausalLM(MiniMindConfig(**{**fields, **overrides})).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(MINIMIND2_TOKENIZER))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cached_decode_equals_uncached_forward():
    model = tiny_model()
    ids = torch.randint(3, 6400, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(capacity=4)  # small, so the buffers have to grow on the way
        steps = [model(ids[:, :8], cache=cache, use_cache=True).logits[:, -1]]
        for position in range(8, 14):
            steps.append(model(ids[:, position:position + 1], cache=cache, use_cache=True).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 7:13], rtol=1e-4, atol=1e-5)


def test_greedy_decode_equals_argmax_of_uncached_forward():
    model = tiny_model()
    ids = torch.randint(3, 6400, (1, 9))
    tokens = torch.cat(list(decode(model, ids, max_new_tokens=6)))
    sequence = ids
    with torch.no_grad():
        for _ in range(6):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens.tolist() == sequence[0, 9:].tolist()


def test_decode_with_timed_thread_counts_gives_the_same_tokens():
    """With a ThreadPolicy on the prepared model (generate, chat and eval on a CPU), every decoding
    step runs through it, on either count, and the tokens are those of a fixed count."""
    model, default_threads = tiny_model(), torch.get_num_threads()
    ids = torch.randint(3, 6400, (2, 9))
    decoder = prepare(model)
    expected = generate(decoder, ids, max_new_tokens=10, eos_token_id=[]).token_ids
    decoder.threads = ThreadPolicy(1, 2, explore=3)
    try:
        assert generate(decoder, ids, max_new_tokens=10, eos_token_id=[]).token_ids == expected
        assert decoder.threads.steps[1] > 0 and decoder.threads.steps[2] > 0
        assert sum(decoder.threads.steps.values()) == 9  # a step per token after the prefill's first
        assert torch.get_num_threads() == 2  # every thread again once the reply is done
    finally:
        torch.set_num_threads(default_threads)


@pytest.mark.parametrize("avx512", [True, False])
def test_batched_greedy_equals_one_by_one(monkeypatch, avx512):
    """Each prompt gets the same greedy tokens alone as in a batch; also where one row reads the (in,
    out) copy of a matrix and several rows the packed one (an x86 CPU without AVX-512)."""
    monkeypatch.setattr(weights, "avx512_or_not_x86", lambda device: avx512)
    model = tiny_model()
    torch.manual_seed(1)
    prompts = [torch.randint(3, 6400, (n,)).tolist() for n in (1, 11, 5, 8)] + [[]]
    batched = generate(model, prompts, max_new_tokens=12, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=12, eos_token_id=[])
        assert batched.token_ids[row] == alone.token_ids[0]


def test_matches_transformers_generate():
    model = tiny_model()
    ids = torch.randint(3, 6400, (1, 7))
    ours = generate(model, ids, max_new_tokens=10, eos_token_id=[]).token_ids[0]
    theirs = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, 7:].tolist()


def test_trained_model_reproduces_repeated_text(tokenizer):
    text = "MiniMind is small. It learns fast on a CPU. 小模型也能说话！"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([(ids + [0]) * 3])
    model = tiny_model(seed=3)
    loss = memorize(model, sequence, steps=150)
    assert loss.item() < 0.1
    out = generate(model, [ids[:3]], max_new_tokens=len(ids), tokenizer=tokenizer, temperature=0.0,
                   eos_token_id=[0])
    assert tokenizer.decode(ids[:3]) + out.texts[0] == text
    assert out.finish_reasons == ["eos"]


# ---------------------------------------------------------------- the prepared decoder against the plain model

FAMILIES = {"minimind2": {}, "minimind3 (q/k norms)": {"model_family": "minimind3", "qk_norm": True},
            "mixture of experts": {"use_moe": True},
            "MiniMind-3 experts (top 1)": {"model_family": "minimind3", "qk_norm": True, "use_moe": True},
            "grouped 3:1": {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96},
            "MiniMind-3 YaRN": {"model_family": "minimind3", "qk_norm": True, "rope_theta": 500.0,
                                "max_position_embeddings": 4096, "inference_rope_scaling": True}}


def full_forward_greedy(model, prompt, new_tokens):
    """The definition of greedy decoding: the argmax of the whole sequence's forward pass, no cache."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("overrides", FAMILIES.values(), ids=FAMILIES.keys())
def test_prepared_decoder_gives_the_full_forward_greedy_tokens_in_batches(overrides):
    """Fused, packed weights and the slot cache, prompts of different lengths decoded together: each
    row's tokens are the plain model's greedy tokens for that prompt alone."""
    model = tiny_model(seed=3, **overrides)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 6400, (n,)).tolist() for n in (7, 1, 12, 4)]
    out = generate(model, prompts, max_new_tokens=10, eos_token_id=[])
    assert out.token_ids == [full_forward_greedy(model, prompt, 10) for prompt in prompts]


@pytest.mark.parametrize("overrides", FAMILIES.values(), ids=FAMILIES.keys())
def test_prefill_and_steps_give_the_model_logits(overrides):
    """PreparedModel.prefill (in chunks, the server's way) and step against the model's forward: logits
    within 1e-4 at every position, float32."""
    model = tiny_model(seed=5, **overrides)
    prepared = PreparedModel(model)
    ids = torch.randint(3, 6400, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits[0]
    cache = prepared.new_cache(slots=3, limit=64, capacity=4)  # small: it grows on the way
    logits = [prepared.prefill(cache, [2], ids[:, :5])[0]]
    logits.append(prepared.prefill(cache, [2], ids[:, 5:13], start=5)[0])
    for position in range(13, 20):  # row 2 decodes beside two idle rows
        cache.lengths[:2] = [0, 0]
        tokens = torch.tensor([0, 0, int(ids[0, position])])
        logits.append(prepared.step(cache, tokens, active=[False, False, True])[2])
    torch.testing.assert_close(torch.stack(logits), expected[[4, 12, *range(13, 20)]], rtol=1e-4, atol=1e-4)
    assert cache.lengths[2] == 20


@pytest.mark.parametrize("overrides", FAMILIES.values(), ids=FAMILIES.keys())
def test_a_step_and_a_prompt_in_one_pass_equal_the_two_passes(overrides):
    """PreparedModel.step_and_prefill (the server's engine, when a prompt arrives while other rows
    decode): the step's logits, the prompt's, the rows' lengths and every key and value stored, as
    step() and then prefill() give them; a fresh prompt, then the second chunk of another (the cache
    grows on the way)."""
    model = tiny_model(seed=7, **overrides)
    prepared = PreparedModel(model)
    generator = torch.Generator().manual_seed(8)
    decoding, fresh, chunked = (torch.randint(3, 6400, shape, generator=generator) for shape in ((2, 6), (1, 9), (1, 19)))
    tokens = torch.randint(3, 6400, (2, 4), generator=generator)
    active = [True, True, False, False]  # rows 2 and 3 ride along in the step, reading their prompts
    results = []
    for together in (False, True):
        cache = prepared.new_cache(slots=4, limit=64, capacity=8)
        prepared.prefill(cache, [0, 1], decoding)
        prepared.prefill(cache, [3], chunked[:, :7])
        logits = []
        for step_tokens, rows, ids, start in ((tokens[0], [2], fresh, 0), (tokens[1], [3], chunked[:, 7:], 7)):
            if together:
                logits += prepared.step_and_prefill(cache, step_tokens, active, rows, ids, start=start)
            else:
                logits += [prepared.step(cache, step_tokens, active), prepared.prefill(cache, rows, ids, start=start)]
        stored = [buffer[:, row, :, :length] for buffer in cache.buffers for row, length in enumerate(cache.lengths)]
        results.append((logits, list(cache.lengths), stored))
    (apart, lengths_apart, stored_apart), (together, lengths_together, stored_together) = results
    assert lengths_apart == lengths_together == [8, 8, 9, 19]
    for expected, got in zip(apart + stored_apart, together + stored_together):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill():
    model = tiny_model(seed=6)
    prepared = prepare(model)
    prompt = torch.randint(3, 6400, (1, 37))
    whole = prepared.new_cache(1, 64)
    chunked = prepared.new_cache(1, 64)
    first = prepared.prefill(whole, [0], prompt)
    for start in range(0, 37, 8):
        last = prepared.prefill(chunked, [0], prompt[:, start:start + 8], start=start)
    assert torch.equal(first.argmax(-1), last.argmax(-1))
    tokens = []
    for cache in (whole, chunked):
        token, row = first.argmax(-1), []
        for _ in range(8):
            token = prepared.step(cache, token).argmax(-1)
            row.append(int(token))
        tokens.append(row)
    assert tokens[0] == tokens[1]


def test_one_row_reads_the_copy_measured_fastest(monkeypatch):
    """settle_few_rows keeps the copy whose one-row products were fastest (up to as many rows as it beat
    the packed layout at every count measured; none unless it saves 5%), once per process and shape, and
    makes the copy when a pass of that few rows first comes; a model prepared here decodes the same
    from every copy."""
    measured = []

    def times(given):
        def time_products(products, packed, passes, rows):
            assert all(len(functions) == len(packed) for functions in products.values())
            measured.append(rows)
            return {(name, rows): given[name][rows] for name in products}
        return time_products

    cases = [({"packed": {1: 5, 2: 7, 4: 7, 8: 7}, "row_blocks": {1: 10, 2: 11, 4: 11, 8: 11},
               "columns": {1: 4, 2: 5, 4: 6, 8: 9}}, "columns", 4, [1, 2, 4, 8]),
             ({"packed": {1: 5, 2: 5, 4: 5, 8: 5}, "row_blocks": {1: 3, 2: 6, 4: 4, 8: 4},
               "columns": {1: 8, 2: 9, 4: 9, 8: 9}}, "row_blocks", 1, [1, 2]),
             ({"packed": {1: 5, 2: 5, 4: 5, 8: 5}, "row_blocks": {1: 4.9, 2: 4, 4: 4, 8: 4},
               "columns": {1: 8, 2: 9, 4: 9, 8: 9}}, None, 0, [1])]
    model = tiny_model(seed=9)
    reference = generate(prepare(model), [[5, 6, 7]], max_new_tokens=6, eos_token_id=None)
    for layouts, layout, limit, timed in cases:
        monkeypatch.setattr(weights, "_FEW_ROWS", {})
        monkeypatch.setattr(weights, "time_products", times(layouts))
        prepared = prepare(model)
        if prepared.lm_head.format != "packed":
            pytest.skip("a torch without oneDNN packs no matrix")
        assert (prepared.few_rows.layout, prepared.few_rows.limit) == (layout, limit)
        assert all(m.few_rows == limit and m.source is None for m in prepared.matrices())  # copies made
        assert generate(prepared, [[5, 6, 7]], max_new_tokens=6, eos_token_id=None) == reference
        again = prepare(model)  # the same shapes: measured once (one row, then more rows while the copy won)
        assert measured == timed and again.few_rows is prepared.few_rows
        measured.clear()
        assert all(m.few_rows == limit and (m.source is None) == (layout is None) for m in again.matrices())
        assert generate(again, [[5, 6, 7]], max_new_tokens=6, eos_token_id=None) == reference
        assert all(m.source is None for m in again.matrices())  # the copy made as one row came
    monkeypatch.undo()
    monkeypatch.setattr(weights, "_FEW_ROWS", {})
    chosen = prepare(model).few_rows  # really measured: one row from every layout, then more from the copy
    assert chosen.layout in (None, *weights.FEW_ROWS_COPIES)
    assert {("packed", 1), *((name, 1) for name in weights.FEW_ROWS_COPIES)} <= set(chosen.times)
    if chosen.layout is not None:
        counts = [rows for rows in weights.FEW_ROWS if (chosen.layout, rows) in chosen.times]
        assert counts == list(weights.FEW_ROWS[:len(counts)]) and chosen.limit in counts
        assert all(("packed", rows) in chosen.times for rows in counts)


def test_linear_weights_are_the_plain_product(monkeypatch):
    """Every format against the plain formula: float32 (packed, and each copy that a few rows may
    read) equals F.linear; int8 equals F.linear of
    the quantized activations (xq * step, each row its own step) and the dequantized matrix (q * scale),
    by whichever product runs (one row: _int_mm; several: oneDNN's int8 matmul), and a row's result is
    the same alone or in a batch. (fbgemm's one-row product, with its own quantization, is the next test.)"""
    monkeypatch.setitem(weights._WORKS, ("dynamic", "cpu"), False)
    torch.manual_seed(7)
    weight, x = torch.randn(48, 32), torch.randn(5, 3, 32)
    default_threads = torch.get_num_threads()
    for layout in (None, *weights.FEW_ROWS_COPIES):  # the packed layout alone, or a second copy for up to 8 rows
        prepared = LinearWeights(weight)
        if prepared.format != "packed":  # a torch without oneDNN: F.linear
            break
        prepared.keep_few_rows(layout, 8)
        try:
            for threads in (1, 2, 3, 5):  # row_blocks: a block per thread (at least two), a divisor of 48: 2, 2, 3, 4
                torch.set_num_threads(threads)
                for rows in (x[:1, :1], x[1, :2], x[2:4, 1:2], x[0], x[1:3, :2], x[:3], x):  # 1, 2, 2, 3, 4, 9, 15 rows
                    torch.testing.assert_close(prepared(rows), torch.nn.functional.linear(rows, weight),
                                               rtol=1e-5, atol=1e-5)
        finally:
            torch.set_num_threads(default_threads)
        assert prepared.source is None and (prepared.few_rows_copy is None) == (layout is None)
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    dequantized = q.float() * scale[:, None]
    assert (dequantized - weight).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest: half a step
    rows = x.reshape(-1, 32)
    xq, step = quantize_rows(rows)
    assert xq.dtype == torch.int8 and (xq.abs().amax(dim=1) == 127).all()
    assert ((xq.float() * step - rows).abs() <= step / 2 + 1e-6).all()
    expected = torch.nn.functional.linear(xq.float() * step, dequantized).view(5, 3, 48)
    int8 = LinearWeights(int8=(q, scale))
    batch = int8(x)
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-4)
    for row, column in ((0, 0), (2, 1), (4, 2)):
        torch.testing.assert_close(int8(x[row:row + 1, column:column + 1]), batch[row:row + 1, column:column + 1],
                                   rtol=1e-6, atol=0)


def test_one_row_through_fbgemm_is_within_a_quantization_step_of_the_batch_product(monkeypatch):
    """Where fbgemm's dynamic linear runs, one row goes through it: its activation scale and zero point
    are its own (asymmetric), so the result is not the batch's to the bit, but each output is within
    what one activation step of error can move it (step x the row's sum of |weights|)."""
    if not weights.works("dynamic", "cpu"):
        pytest.skip("this torch has no fbgemm dynamic linear")
    monkeypatch.setattr(weights, "avx512_or_not_x86", lambda device: True)
    torch.manual_seed(7)
    weight, x = torch.randn(48, 32), torch.randn(6, 32)
    q, scale = quantize_int8(weight)
    dequantized = q.float() * scale[:, None]
    int8 = LinearWeights(int8=(q, scale))
    assert int8.product.one_row_dynamic and int8.product.dynamic is None  # made at the first row alone
    batch = int8(x)
    assert int8.product.dynamic is None
    for row in range(6):
        alone = int8(x[row:row + 1])
        step = float(x[row].max().clamp(min=0) - x[row].min().clamp(max=0)) / 255  # fbgemm's range includes 0
        bound = step * dequantized.abs().sum(dim=1) + 1e-4
        exact = torch.nn.functional.linear(x[row:row + 1], dequantized)[0]
        assert ((alone[0] - exact).abs() <= bound).all()
        assert ((alone[0] - batch[row]).abs() <= 2 * bound).all()
    assert int8.product.dynamic is not None


@pytest.mark.parametrize("why", ["no int8 x int8 products", "a CPU without AVX-512"])
def test_int8_falls_back_to_weight_only_products(monkeypatch, why):
    """Where int8 x int8 products do not run (CUDA; a torch without them), or run slower than the
    weight-only one (x86 without AVX-512: no VNNI), int8 weights meet bfloat16 activations: the plain
    formula up to bfloat16's rounding of the activations."""
    if why == "a CPU without AVX-512":
        monkeypatch.setattr(weights.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(weights.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert not weights.avx512_or_not_x86("cpu") and weights.avx512_or_not_x86("meta")
    else:
        for name in ("int_mm", "qlinear", "dynamic"):
            monkeypatch.setitem(weights._WORKS, (name, "cpu"), False)
    torch.manual_seed(7)
    weight, x = torch.randn(48, 32), torch.randn(5, 32)
    q, scale = quantize_int8(weight)
    int8 = LinearWeights(int8=(q, scale))
    assert not int8.product.int_mm and int8.product.packed is None and not int8.product.one_row_dynamic
    for rows in (x, x[:1]):
        y = int8(rows)
        assert y.dtype == torch.bfloat16  # the products' own dtype; the decoder casts where it matters
        torch.testing.assert_close(y.float(), torch.nn.functional.linear(rows, q.float() * scale[:, None]),
                                   rtol=2e-2, atol=5e-2)


def test_int8_logits_stay_close_to_float32():
    """int8 weights (and bfloat16 activations in their products): logits of a trained-looking scale within
    5% of the logits' range of float32's; the model's own forward and the prepared decoder agree."""
    model = tiny_model(seed=8)
    ids = torch.randint(3, 6400, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        quantized = quantize_linears(tiny_model(seed=8))
        assert isinstance(quantized.lm_head, Int8Linear) and isinstance(quantized.model.layers[0].mlp.up_proj, Int8Linear)
        own = quantized(ids).logits
    span = float(expected.max() - expected.min())
    assert (own - expected).abs().max() <= 0.05 * span
    prepared = prepare(quantized)
    assert prepared.quantize == "int8"
    last = prepared.prefill(prepared.new_cache(2, 32), [0, 1], ids)
    torch.testing.assert_close(last, own[:, -1], rtol=0, atol=0.01 * span)
    assert prepare(model, "int8").weight_bytes() * 3.5 < prepare(model).weight_bytes()  # + a scale per row


def test_int8_reaches_a_mixtures_experts():
    """int8 on a mixture of experts quantizes every expert (the shared one too), not the dense layers
    alone; its logits stay within 5% of the range of float32's; one token reads its k routed experts."""
    model = tiny_model(seed=8, use_moe=True)
    prepared, quantized = prepare(model), prepare(model, "int8")
    assert all(matrix.format == "int8" for matrix in quantized.matrices())
    ids = torch.randint(3, 6400, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    last = quantized.prefill(quantized.new_cache(2, 32), [0, 1], ids)
    assert (last - expected).abs().max() <= 0.05 * float(expected.max() - expected.min())
    routed = sum(m.nbytes() for layer in prepared.layers for expert in layer.feed.experts for m in expert.matrices())
    assert sum(m.nbytes() for m in prepared.matrices()) - prepared.weight_bytes() == routed // 2  # 2 of 4 experts


def test_sampling_follows_the_plain_formula():
    """Sampled frequencies against softmax(logits / T) cut by top-k, then to the top-p nucleus (the plain
    formula, with a full sort): close in total variation, and nothing outside the allowed set. The
    candidates are fewer than the vocabulary, so the fast path and its fallback both run."""
    torch.manual_seed(9)
    vocab = 3 * NUCLEUS_CANDIDATES
    logits = torch.randn(1, vocab) * 2
    generator = torch.Generator().manual_seed(0)

    def plain(temperature, top_k, top_p):
        scaled = logits[0] / temperature
        if 0 < top_k < vocab:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
        ordered, order = scaled.sort(descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        return scaled.masked_fill(drop.scatter(0, order, drop), float("-inf")).softmax(-1)

    draws = 20000
    # the last one: every row's nucleus surely wider than the candidates (not looked for: surely_wider)
    for temperature, top_k, top_p in ((1.0, 0, 0.9), (0.7, 40, 1.0), (1.0, 600, 0.97), (1.5, 0, 1.0), (3.0, 0, 0.99),
                                      (20.0, 0, 0.9)):
        tokens = pick_next_token(logits.expand(draws, -1), temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)
        frequencies = torch.bincount(tokens, minlength=vocab) / draws
        expected = plain(temperature, top_k, top_p)
        assert not bool(((frequencies > 0) & (expected == 0)).any())
        # what exact sampling gives on average: E|f - p| = sqrt(2 p (1 - p) / (pi n)) per token
        noise = 0.5 * float((2 * expected * (1 - expected) / (torch.pi * draws)).sqrt().sum())
        assert 0.5 * (frequencies - expected).abs().sum() < 1.3 * noise + 0.005, (temperature, top_k, top_p)


def test_nucleus_without_a_sort_is_the_sorted_nucleus():
    """nucleus_mask (bins, one bin sorted) keeps as many tokens as a full sort (in float64) keeps,
    and the likeliest ones, on flat, spread and peaked rows (where probabilities tie, either of
    them); and a row's sampled token does not depend on whether a wide row shares its batch."""
    torch.manual_seed(3)
    for scale in (0.003, 0.01, 0.3, 1.0, 4.0):
        probs = (torch.randn(6, 6400) * scale).softmax(-1)
        for top_p in (0.5, 0.85, 0.99):
            ordered = probs.double().sort(dim=-1, descending=True).values
            expected_counts = (ordered.cumsum(-1) - ordered < top_p).sum(-1)
            kept = nucleus_mask(probs, top_p)
            assert torch.equal(kept.sum(-1), expected_counts), (scale, top_p)
            least_kept = probs.masked_fill(~kept, 2.0).amin(-1)
            assert bool((probs.masked_fill(kept, -1.0).amax(-1) <= least_kept).all()), (scale, top_p)
    peaked, flat = torch.randn(1, 6400) * 6, torch.randn(1, 6400) * 0.01
    uniforms = torch.tensor([0.37, 0.81])
    together = pick_next_token(torch.cat([peaked, flat]), temperature=1.0, top_p=0.9, uniforms=uniforms)
    assert together[0] == pick_next_token(peaked, temperature=1.0, top_p=0.9, uniforms=uniforms[:1])[0]
    assert together[1] == pick_next_token(flat, temperature=1.0, top_p=0.9, uniforms=uniforms[1:])[0]


def test_greedy_tokens_are_argmax_to_the_tie():
    """greedy_tokens (block maxima, then the argmax in the first block that holds the greatest) gives
    torch.argmax's index on every row: ties (the first), a greatest in the last, partly filled block,
    rows of -inf, NaN (the first NaN, as argmax), bfloat16, one row, a vocabulary below one block."""
    torch.manual_seed(5)
    for vocab in (6400, 6401, 6527, 100):
        logits = torch.randn(6, vocab)
        logits[0, [7, vocab // 2]] = 50.0  # a tie across blocks
        logits[1, [3, 5]] = 50.0  # a tie inside a block
        logits[2] = -math.inf
        logits[3, [vocab // 3, vocab - 1]] = math.nan
        logits[4, vocab - 1] = 50.0  # in the last block (partly filled where vocab is not a multiple)
        for rows in (logits, logits[:1], logits.to(torch.bfloat16)):
            assert torch.equal(greedy_tokens(rows), rows.argmax(dim=-1)), vocab
    assert torch.equal(pick_next_token(logits[4:], temperature=0), logits[4:].argmax(dim=-1))


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = logits.argmax(-1)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(pick_next_token(logits, temperature=1.0, top_k=1, generator=generator), greedy)
    assert torch.equal(pick_next_token(logits, temperature=1.0, top_p=1e-6, generator=generator), greedy)
    # top_k: sampled tokens always come from the k best
    samples = torch.stack([pick_next_token(logits, temperature=5.0, top_k=3, generator=generator) for _ in range(50)])
    top3 = logits.topk(3, dim=-1).indices
    assert all(torch.isin(samples[:, row], top3[row]).all() for row in range(3))
    # repetition penalty: a seen positive logit is divided, a seen negative one multiplied
    logits = torch.tensor([[2.0, -1.0, 1.5]])
    seen = torch.tensor([[True, True, False]])
    assert pick_next_token(logits, seen, repetition_penalty=2.0).item() == 2
    assert pick_next_token(logits, seen, repetition_penalty=1.0).item() == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_finished_rows_leave_the_steps_and_the_others_decode_as_before(monkeypatch, temperature):
    """Once a quarter of a batch has met eos, the steps decode the other rows alone (drop_finished):
    every row gets the tokens it gets when finished rows are carried to the end, greedy and sampled
    (each row draws its own uniform number as in the whole batch), with a repetition penalty's
    record of seen tokens moved along."""
    model = tiny_model(seed=5)
    torch.manual_seed(6)
    prompts = [torch.randint(3, 6400, (n,)).tolist() for n in (3, 9, 5, 2, 7, 4, 6, 8)]
    kwargs = dict(max_new_tokens=10, temperature=temperature, top_p=0.9, repetition_penalty=5.0, seed=11)
    free = generate(model, prompts, eos_token_id=[], **kwargs).token_ids
    # row r's token r as eos (a strong repetition penalty: no token comes twice): row r ends at step r
    eos = sorted({ids[row] for row, ids in enumerate(free[:6])})
    prepared = prepare(model)
    rows_per_step, step = [], prepared.step
    monkeypatch.setattr(prepared, "step", lambda cache, tokens, active=None:
                        rows_per_step.append(len(tokens)) or step(cache, tokens, active))
    dropped = generate(prepared, prompts, eos_token_id=eos, **kwargs)
    monkeypatch.setattr(decoding, "drop_finished", lambda cache, rows, token, seen, finished: (rows, token, seen))
    carried = generate(model, prompts, eos_token_id=eos, **kwargs)
    assert dropped.token_ids == carried.token_ids
    assert len({len(ids) for ids in dropped.token_ids}) > 3  # the rows end at different steps
    assert rows_per_step[0] == len(prompts) and min(rows_per_step) < len(prompts) // 2


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    prompt = [[5, 6, 7]]
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.3, eos_token_id=[])
    first = generate(model, prompt, seed=7, **kwargs).token_ids
    assert generate(model, prompt, seed=7, **kwargs).token_ids == first
    assert generate(model, prompt, seed=8, **kwargs).token_ids != first


def test_text_stream_waits_for_whole_characters(tokenizer):
    text = "emoji 🎉 and 中文字符"
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) + stream.finish() == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_text_stream_decodes_a_window_and_gives_the_whole_text(tokenizer):
    """A long reply of random tokens (byte fragments of Chinese and emoji among them): the pieces add up
    to the decode of all the tokens and are the pieces of a stream that decodes everything at every
    token, while each push decodes a bounded window; and the decoded pieces add up as the window needs
    (decode(a) + decode(b) == decode(a + b) at every cut where a ends on a whole character)."""
    torch.manual_seed(11)
    ids = tokenizer("开始 🎉 ", add_special_tokens=False)["input_ids"] + torch.randint(3, 6400, (600,)).tolist()
    windows = []
    decode_all = tokenizer.decode

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode(self, token_ids, **kwargs):
            windows.append(len(token_ids))
            return decode_all(token_ids, **kwargs)

    stream, everything = TextStream(Counting()), TextStream(tokenizer)
    everything.additive = False
    assert stream.additive
    pieces = [stream.push(token) for token in ids]
    assert pieces == [everything.push(token) for token in ids]
    assert "".join(pieces) + stream.finish() == decode_all(ids, skip_special_tokens=True)
    assert max(windows) <= 2 * decoding.COMMIT_EVERY
    for cut in range(1, 200):
        left = decode_all(ids[:cut])
        if not left.endswith("\ufffd"):
            assert left + decode_all(ids[cut:200]) == decode_all(ids[:200])


def test_final_text_is_the_text_a_stream_holds(tokenizer):
    """generate without stop strings or on_text decodes each row's text once at the end (final_text):
    the same text as a TextStream fed token by token, at every length of a reply with characters split
    across tokens, and after runs of byte tokens that never make a character (longer than the look back)."""
    torch.manual_seed(5)
    fragments = [i for i in range(3, 6400) if tokenizer.decode([i]) == "\ufffd"][:12]
    assert len(fragments) == 12  # byte-level tokens of partial characters
    ids = (tokenizer("开始 🎉 中文", add_special_tokens=False)["input_ids"] + torch.randint(3, 6400, (40,)).tolist()
           + fragments + tokenizer("ok", add_special_tokens=False)["input_ids"] + fragments)
    stream = TextStream(tokenizer)
    for end, token in enumerate(ids, start=1):
        stream.push(token)
        assert decoding.final_text(tokenizer, ids[:end]) == stream.text, end
    assert decoding.final_text(tokenizer, fragments) == ""
    reply = generate(tiny_model(), [[5, 6, 7]], max_new_tokens=20, eos_token_id=[], tokenizer=tokenizer)
    assert reply.texts == [tokenizer.decode(reply.token_ids[0])]


def test_stop_strings_end_and_are_removed(tokenizer):
    stream = TextStream(tokenizer, stop_strings=["STOP"])
    pieces = [stream.push(t) for t in tokenizer("hello world STOP more", add_special_tokens=False)["input_ids"]]
    assert stream.stopped
    assert "".join(pieces) == stream.text == "hello world "


def test_prompt_longer_than_context_and_empty_prompt(tokenizer, capsys):
    model = tiny_model(max_position_embeddings=32)
    out = generate(model, [list(range(3, 60))], max_new_tokens=8, eos_token_id=[])
    assert len(out.token_ids[0]) == 8
    assert "keeping its last 24" in capsys.readouterr().err
    assert len(generate(model, [[]], max_new_tokens=5, eos_token_id=[]).token_ids[0]) == 5
    list(stream_text(model, tokenizer, [], max_new_tokens=5, temperature=0.0))  # no error


def test_chat_history_is_rendered_through_the_template(tokenizer, model_dir, monkeypatch, capsys):
    prompts = []

    def fake_stream(model, tokenizer, prompt_ids, **kwargs):
        prompts.append(prompt_ids)
        yield f"reply{len(prompts)}"

    monkeypatch.setattr(decoding, "stream_text", fake_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhow are you?\n/reset\nagain\n"))
    assert cli_main(["chat", "--model", str(model_dir), "--system", "Be brief."]) == 0
    assert capsys.readouterr().out.split() == ["reply1", "reply2", "reply3"]
    system = {"role": "system", "content": "Be brief."}
    expected = [
        [system, {"role": "user", "content": "hi"}],
        [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "reply1"},
         {"role": "user", "content": "how are you?"}],
        [system, {"role": "user", "content": "again"}],  # after /reset
    ]
    for ids, messages in zip(prompts, expected):
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_trim_history_drops_oldest_turns(tokenizer):
    messages = [{"role": "system", "content": "S"}]
    for turn in range(6):
        messages += [{"role": "user", "content": f"question {turn} " * 5},
                     {"role": "assistant", "content": f"answer {turn} " * 5}]
    messages.append({"role": "user", "content": "last"})
    kept, ids = trim_history(tokenizer, messages, max_tokens=80)
    assert len(ids) <= 80
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last" and kept[1]["role"] == "user"
    assert len(kept) < len(messages)


def test_chat_command_end_to_end(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))  # EOF after one turn
    assert cli_main(["chat", "--model", str(model_dir), "--max_new_tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_command(model_dir, capsys):
    assert cli_main(["generate", "--model", str(model_dir), "--prompt", "Hello", "--max_new_tokens", "6",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert cli_main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--chat", "--max_new_tokens", "4"]) == 0


def test_generate_command_with_bare_pth(tmp_path, capsys):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "model_final.pth")
    code = cli_main(["generate", "--model", str(tmp_path / "model_final.pth"), "--num_heads", "4",
                     "--tokenizer", str(MINIMIND2_TOKENIZER), "--prompt", "x", "--max_new_tokens", "3"])
    assert code == 0
    assert cli_main(["generate", "--model", str(tmp_path / "missing.pth"), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err


def test_inputs_go_to_the_model_device(monkeypatch):
    """A model on another device (here 'meta', which computes only shapes) gets its inputs there:
    prompts built on the CPU would otherwise fail on a GPU model at the first forward."""
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                            max_position_embeddings=64)
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    seen, embedding = [], torch.nn.functional.embedding
    # the ids as the embedding meets them (the decoder looks them up with F.embedding)
    monkeypatch.setattr(torch.nn.functional, "embedding", lambda ids, *args, **kwargs:
                        seen.append(ids.device) or embedding(ids, *args, **kwargs))
    steps = decode(model, torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long), max_new_tokens=3)
    tokens = [next(steps) for _ in range(3)]
    assert [t.device.type for t in tokens] == ["meta"] * 3
    assert seen and all(device.type == "meta" for device in seen)


def test_device_flag_of_the_inference_verbs(model_dir, capsys):
    assert cli_main(["generate", "--model", str(model_dir), "--prompt", "x", "--max_new_tokens", "2",
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(model_dir), "--prompt", "x", "--device", "cuda:7"
                     if not torch.cuda.is_available() else "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device") and len(err.splitlines()) == 1


# ---------------------------------------------------------------- thinking and tool calls in replies

REPLIES = {
    "thinking then a tool call": (
        '<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>',
        'thinking: I need the weather tool.\ntool call: get_weather({"city": "Paris"})'),
    "empty thinking, content, two calls": (
        '<think>\n\n</think>\n\n我来查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>',
        '我来查一下。\ntool call: get_weather({"city": "北京"})\ntool call: get_time({})'),
    "plain answer with a lone <": ("Yes: 3 < 4, and <b> stays.", "Yes: 3 < 4, and <b> stays."),
    "a call that is not JSON": ("<tool_call>look it up</tool_call> done", "tool call: look it up done"),
}


@pytest.mark.parametrize("name", REPLIES)
def test_reply_formatter_shows_thinking_and_tool_calls_apart(name):
    text, shown = REPLIES[name]
    whole = ReplyFormatter()
    assert whole.push(text) + whole.finish() == shown
    streamed = ReplyFormatter()  # one character at a time, tags split across pieces
    assert "".join(streamed.push(char) for char in text) + streamed.finish() == shown


def test_reply_formatter_inside_an_opened_think_block_and_dimmed():
    formatter = ReplyFormatter(thinking=True, dim=True)
    shown = formatter.push("First, add.\n</think>\n\n4") + formatter.finish()
    assert shown == "\033[2mthinking: First, add.\033[0m\n4"
    unfinished = ReplyFormatter(thinking=True)
    assert unfinished.push("still thinking\n") + unfinished.finish() == "thinking: still thinking\n"


def test_chat_shows_thinking_and_tool_calls_and_keeps_the_raw_reply(model_dir, monkeypatch, capsys):
    """With MiniMind-3's tokenizer and --open_thinking the prompt opens a think block; the reply is shown
    formatted, and the history keeps the reply's own text."""
    from .conftest import MINIMIND3_TOKENIZER
    prompts, reply = [], 'The user wants weather.\n</think>\n\n<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>'

    def fake_stream(model, tokenizer, prompt_ids, **kwargs):
        prompts.append(tokenizer.decode(prompt_ids))
        yield from (reply[:9], reply[9:40], reply[40:])

    monkeypatch.setattr(decoding, "stream_text", fake_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("weather?\nthanks\n"))
    assert cli_main(["chat", "--model", str(model_dir), "--tokenizer", str(MINIMIND3_TOKENIZER), "--open_thinking"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:2] == ["thinking: The user wants weather.", "tool call: w({})"]
    assert "model: MiniMind2, dense, 2 layers, hidden 64" in captured.err
    assert prompts[0].endswith("<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    # the earlier reply is in the history as the model wrote it (the template re-renders its thinking)
    assert '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call><|im_end|>\n<|im_start|>user\nthanks' in prompts[1]


def test_chat_commands_and_ctrl_c(model_dir, monkeypatch, capsys):
    """/help and unknown /commands are answered, not sent to the model; Ctrl-C during a reply stops that
    reply (the chat goes on), Ctrl-C at the prompt leaves with exit code 0."""
    prompts = []

    def stream_until_ctrl_c(model, tokenizer, prompt_ids, **kwargs):
        prompts.append(tokenizer.decode(prompt_ids))
        yield "partial"
        if len(prompts) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the first reply is being written (in this thread)
        yield " rest"

    lines = iter(["hi", "/help", "/frobnicate", "/usr/bin is a folder", "again"])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt

    monkeypatch.setattr(decoding, "stream_text", stream_until_ctrl_c)
    monkeypatch.setattr("builtins.input", typed)
    assert cli_main(["chat", "--model", str(model_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["partial", "partial rest", "partial rest"]
    assert "(reply stopped)" in err
    assert "/help" in err and "/reset" in err and "/exit" in err and "Ctrl-C" in err
    assert "unknown command /frobnicate; /help lists the commands" in err
    assert len(prompts) == 3 and "/usr/bin is a folder" in prompts[1] and "/help" not in "".join(prompts)
    assert prompts[2].count("partial") == 2  # the stopped reply stays in the history as it was shown
