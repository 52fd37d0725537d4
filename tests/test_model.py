"""The model against numbers computed by the original MiniMind2 code, and the places we fix it."""
import json
import math
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

from minimind import MiniMindConfig, MiniMindForCausalLM, load_model
from minimind.errors import CheckpointError
from minimind.model.checkpoint import describe_model, save_state_dict
from minimind.model.model import KVCache, MiniMind3Gate, MoEGate, precompute_rotary_frequencies

from .conftest import MINIMIND3_CHECKPOINTS, SEED_CHECKPOINTS

TOL = 1e-4


def fixture_model(seed_checkpoints, name):
    """The original's float16 weights, upcast to float32 as load_model does."""
    config = MiniMindConfig(**json.loads((seed_checkpoints / f"{name}_config.json").read_text()))
    return load_model(seed_checkpoints / f"{name}_fp16.pth", config=config)


def expected(seed_checkpoints, name):
    """What the original code computed with these weights (logits at every 8th vocabulary id)."""
    return torch.load(seed_checkpoints / f"{name}_expected.pt", weights_only=True)


def at_columns(logits, ref):
    return logits[..., ref["vocab_columns"]]


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["dense_tiny", "moe_tiny"])
def test_logits_match_original(seed_checkpoints, name):
    model, ref = fixture_model(seed_checkpoints, name), expected(seed_checkpoints, name)
    assert model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        assert max_diff(at_columns(model(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL


@pytest.mark.parametrize("name", ["dense_tiny", "moe_tiny"])
def test_kv_cache_decode_matches_original(seed_checkpoints, name):
    model, ref = fixture_model(seed_checkpoints, name), expected(seed_checkpoints, name)
    assert max_diff(at_columns(cached_decode_logits(model, ref), ref), ref["decode_logits"]) <= TOL


@torch.no_grad()
def cached_decode_logits(model, ref):
    """Prefill the first decode_prefill tokens, then one token at a time through the cache: each
    step's last-position logits, the prefill's first (the fixtures' decode protocol)."""
    ids, prefill = ref["input_ids"], int(ref["decode_prefill"])
    out = model(ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits[:, -1]], out.cache
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


@pytest.mark.parametrize("name", ["dense_tiny", "moe_tiny"])
def test_train_mode_aux_loss_matches_original(seed_checkpoints, name):
    model, ref = fixture_model(seed_checkpoints, name), expected(seed_checkpoints, name)
    model.train()
    torch.manual_seed(7)
    aux = model(ref["input_ids"]).aux_loss
    assert abs(aux.item() - float(ref["train_aux_loss_seed7"])) <= 1e-5


def test_hugging_face_directory_loads(seed_checkpoints):
    ref = expected(seed_checkpoints, "dense_tiny")
    for model in (load_model(seed_checkpoints / "dense_tiny_hf"),
                  AutoModelForCausalLM.from_pretrained(seed_checkpoints / "dense_tiny_hf").eval()):
        assert isinstance(model, MiniMindForCausalLM)
        with torch.no_grad():
            assert max_diff(at_columns(model(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL


def test_shape_inferred_from_bare_state_dict(seed_checkpoints):
    """A .pth without config: sizes come from tensor shapes, head count from the caller."""
    ref = expected(seed_checkpoints, "moe_tiny")
    model = load_model(seed_checkpoints / "moe_tiny_fp16.pth", num_attention_heads=4, max_position_embeddings=512)
    assert (model.config.num_key_value_heads, model.config.n_routed_experts, model.config.n_shared_experts) == (2, 4, 1)
    with torch.no_grad():
        assert max_diff(at_columns(model(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL


def test_save_pretrained_round_trip(seed_checkpoints, tmp_path):
    model, ref = fixture_model(seed_checkpoints, "moe_tiny"), expected(seed_checkpoints, "moe_tiny")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, MiniMindForCausalLM)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(reloaded(ref["input_ids"]).logits, model(ref["input_ids"]).logits)


def test_original_format_state_dict_round_trip(seed_checkpoints, tmp_path):
    model = fixture_model(seed_checkpoints, "dense_tiny")
    save_state_dict(model, tmp_path / "model.pth")
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    original = torch.load(seed_checkpoints / "dense_tiny_fp16.pth", weights_only=True)
    assert state.keys() == original.keys()  # lm_head.weight included, as the original writes it
    assert all(torch.equal(state[k], original[k].float()) for k in state)


def test_chunked_prefill_equals_one_pass(seed_checkpoints):
    """The original's is_causal=True after a cache mis-aligns the mask; ours must not."""
    for name in ("dense_tiny", "moe_tiny"):
        model, ids = fixture_model(seed_checkpoints, name), expected(seed_checkpoints, name)["input_ids"]
        with torch.no_grad():
            full = model(ids).logits
            cache = KVCache(capacity=4)  # small, so the buffers must grow on the way
            chunks = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 7), (7, 15), (15, 24))]
        assert max_diff(torch.cat(chunks, 1), full) <= TOL


def test_left_padding_gives_each_row_its_own_logits(seed_checkpoints):
    for name in ("dense_tiny", "moe_tiny"):
        model, ids = fixture_model(seed_checkpoints, name), expected(seed_checkpoints, name)["input_ids"]
        long, short = ids[0, :20], ids[1, :11]
        batch = torch.stack([long, torch.cat([torch.zeros(9, dtype=torch.long), short])])
        mask = torch.stack([torch.ones(20), torch.cat([torch.zeros(9), torch.ones(11)])]).long()
        with torch.no_grad():
            logits = model(batch, attention_mask=mask).logits
            assert max_diff(logits[0], model(long[None]).logits[0]) <= TOL
            assert max_diff(logits[1, 9:], model(short[None]).logits[0]) <= TOL
            # and the same through the cache, one token at a time after a padded prefill
            out = model(batch[:, :15], attention_mask=mask[:, :15], use_cache=True)
            step = model(batch[:, 15:16], attention_mask=mask[:, :16], cache=out.cache, use_cache=True)
            assert max_diff(step.logits[1, -1], model(short[None, :7]).logits[0, -1]) <= TOL


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=50, max_position_embeddings=64)
    model = MiniMindForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    logp = out.logits.log_softmax(-1)
    picked = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(4, 10)]
    assert abs(out.loss.item() - torch.stack(picked).mean().item()) < 1e-5


@pytest.mark.parametrize("use_moe", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_moe):
    """Recomputing each block in backward (with its dropout masks replayed) changes nothing but memory."""
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=50, max_position_embeddings=64, dropout=0.1, use_moe=use_moe)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).train()
    ids = torch.randint(0, 50, (2, 12))
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for checkpointing in (False, True):
        calls.clear()
        model.model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing runs the attention again in backward
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], atol=1e-6), name


def test_mismatched_checkpoint_is_refused_with_the_keys(seed_checkpoints, tmp_path):
    state = torch.load(seed_checkpoints / "dense_tiny_fp16.pth", weights_only=True)
    config = MiniMindConfig(**json.loads((seed_checkpoints / "dense_tiny_config.json").read_text()))
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.extra.weight"] = torch.zeros(3)
    broken["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "broken.pth", config=config)
    message = str(error.value)
    for part in ("missing 1", "model.layers.1.mlp.up_proj.weight", "unexpected 1", "model.layers.0.extra.weight",
                 "wrong shape 1", "k_proj.weight (checkpoint (16, 64), model (32, 64))"):
        assert part in message
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(seed_checkpoints / "dense_tiny_fp16.pth", config=config, num_hidden_layers=3)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Exploit()}, f)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "evil.pth", num_attention_heads=4)
    assert "must never run" not in capsys.readouterr().out


def test_config_defaults_are_the_originals():
    c = MiniMindConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (512, 8, 8, 2, 6400)
    assert c.intermediate_size == 1408 and c.max_position_embeddings == 32768 and c.rope_theta == 1e6
    assert (c.rms_norm_eps, c.dropout, c.hidden_act, c.flash_attn, c.bos_token_id, c.eos_token_id) == (1e-5, 0.0, "silu", True, 1, 2)
    assert (c.use_moe, c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.scoring_func) == (False, 4, 2, 1, "softmax")
    assert (c.aux_loss_alpha, c.seq_aux, c.norm_topk_prob, c.inference_rope_scaling) == (0.1, True, True, False)
    assert c.yarn_parameters == {"factor": 4, "beta_fast": 4, "beta_slow": 1, "original_max_position_embeddings": 2048}


def test_yarn_scales_slow_frequencies_only():
    """Original MiniMind YaRN: pair 0 (b = beta_slow = 1) keeps (b*s-b+1)/(b*s) = 1; pairs slower than the
    training context are divided by the factor; nothing changes when the table fits the context."""
    yarn = {"factor": 4, "beta_fast": 4, "beta_slow": 1, "original_max_position_embeddings": 2048}
    cos_plain, sin_plain = precompute_rotary_frequencies(64, 32768, 1e6)
    cos_yarn, sin_yarn = precompute_rotary_frequencies(64, 32768, 1e6, yarn)
    plain, scaled = torch.atan2(sin_plain[1, :32], cos_plain[1, :32]), torch.atan2(sin_yarn[1, :32], cos_yarn[1, :32])
    assert torch.allclose(plain[0], scaled[0])
    assert torch.allclose(scaled[-1], plain[-1] / 4)
    short = precompute_rotary_frequencies(64, 2048, 1e6, yarn)
    assert torch.equal(short[0], precompute_rotary_frequencies(64, 2048, 1e6)[0])


def test_token_level_aux_loss_by_hand():
    torch.manual_seed(3)
    config = MiniMindConfig(hidden_size=16, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                            use_moe=True, seq_aux=False, aux_loss_alpha=0.1)
    gate = MoEGate(config).train()
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(2, 5, 16)
    idx, weight, aux = gate(x)
    scores = (x.reshape(-1, 16) @ gate.weight.T).softmax(-1)
    share = torch.stack([(idx == e).float().sum() for e in range(4)]) / idx.numel()
    assert abs(aux.item() - 0.1 * (scores.mean(0) * share * 4).sum().item()) < 1e-6
    assert torch.allclose(weight.sum(-1), torch.ones(10))


def test_top1_router_weight_is_not_renormalised():
    """With one expert per token the original multiplies by the raw router probability."""
    config = MiniMindConfig(hidden_size=16, num_attention_heads=2, use_moe=True, num_experts_per_tok=1, n_shared_experts=0)
    torch.manual_seed(0)
    gate = MoEGate(config).eval()
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(1, 6, 16)
    _, weight, _ = gate(x)
    assert torch.allclose(weight[:, 0], (x.reshape(-1, 16) @ gate.weight.T).softmax(-1).max(-1).values)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, use_moe=True,
                                               num_experts_per_tok=1, n_shared_experts=0, vocab_size=32))
    assert not any("shared_experts" in k for k in model.state_dict())
    assert model(torch.randint(0, 32, (2, 5))).logits.shape == (2, 5, 32)


def test_moe_training_keeps_float32():
    """The original wrote expert outputs into a float16 buffer in training."""
    config = MiniMindConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, use_moe=True, vocab_size=32)
    model = MiniMindForCausalLM(config).train()
    ids = torch.randint(0, 32, (2, 6))
    train_logits = model(ids).logits
    model.eval()
    assert train_logits.dtype == torch.float32
    assert torch.allclose(train_logits, model(ids).logits, atol=1e-6)


@pytest.mark.parametrize("family", ["minimind2", "minimind3"])
def test_every_expert_gets_a_gradient_even_without_tokens(family):
    """One token picks 2 of 4 experts; the other two still get a (zero) gradient in training, so
    DistributedDataParallel, which waits for every parameter's, finishes its reduction."""
    config = MiniMindConfig(model_family=family, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                            num_hidden_layers=1, use_moe=True, n_routed_experts=4, num_experts_per_tok=2,
                            vocab_size=32)
    model = MiniMindForCausalLM(config).train()
    out = model(torch.tensor([[3, 7]]), labels=torch.tensor([[3, 7]]))
    (out.loss + out.aux_loss).backward()
    experts = model.model.layers[0].mlp.experts
    used = [expert.down_proj.weight.grad.abs().sum().item() > 0 for expert in experts]
    assert not all(used)  # some expert had no token
    assert all(p.grad is not None for expert in experts for p in expert.parameters())


def test_repeated_key_value_heads_attend_as_grouped_ones():
    """Where the fused kernels take no grouped heads (CUDA with a mask or in float32), the key/value
    heads are repeated: query head h must still read head h // (H/G), as enable_gqa reads it."""
    from minimind.model.model import fused_kernel_groups_heads, repeat_key_value_heads
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # a left-padded row
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    grouped = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    repeated = torch.nn.functional.scaled_dot_product_attention(q, *repeat_key_value_heads(k, v, 4), attn_mask=mask)
    torch.testing.assert_close(repeated, grouped)
    assert fused_kernel_groups_heads(q, mask)  # on a CPU the grouped heads go to the kernel as they are


def test_rotary_tables_follow_autocast():
    """Under autocast the tables come in its dtype, so that q and k stay in half precision into
    attention instead of being promoted to float32 by the rotation."""
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                               num_hidden_layers=1, vocab_size=64))
    seen = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    ids = torch.randint(0, 64, (1, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    model(ids)
    assert seen == [torch.bfloat16, torch.float32]


def test_odd_head_counts_and_gqa_ratios_run():
    for heads, kv_heads in ((3, 1), (6, 3), (5, 5)):
        config = MiniMindConfig(hidden_size=heads * 8, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                num_hidden_layers=1, vocab_size=40)
        model = MiniMindForCausalLM(config).eval()
        ids = torch.randint(0, 40, (1, 9))
        with torch.no_grad():
            full = model(ids).logits
            out = model(ids[:, :5], use_cache=True)
            step = model(ids[:, 5:], cache=out.cache, use_cache=True).logits
        assert max_diff(torch.cat([out.logits, step], 1), full) <= TOL


def test_invalid_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        MiniMindForCausalLM(MiniMindConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=4))


def test_yarn_model_reloads_with_from_pretrained(tmp_path):
    """inference_rope_scaling builds its tables with Python comparisons, which failed on the meta
    device that from_pretrained builds modules on."""
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=4096, inference_rope_scaling=True)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.inference_rope_scaling
    ids = torch.randint(0, 6400, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    plain = precompute_rotary_frequencies(16, 4096, 1e6)[0]
    assert torch.equal(reloaded.model.rotary_emb.cos, model.model.rotary_emb.cos)
    assert not torch.equal(reloaded.model.rotary_emb.cos, plain)  # the YaRN table, not the plain one


# ---------------------------------------------------------------- MiniMind-3

MINIMIND3_MODELS = {"dense3_tiny": "dense3_tiny", "dense3_yarn_tiny": "dense3_tiny", "moe3_tiny": "moe3_tiny"}


def minimind3_model(name):
    """A MiniMind-3 fixture: its config as the original names the fields, its float16 weights upcast."""
    config = MiniMindConfig(**json.loads((MINIMIND3_CHECKPOINTS / f"{name}_config.json").read_text()))
    return load_model(MINIMIND3_CHECKPOINTS / f"{MINIMIND3_MODELS[name]}_fp16.pth", config=config)


@pytest.mark.parametrize("name", MINIMIND3_MODELS)
def test_minimind3_logits_match_original(name):
    model, ref = minimind3_model(name), expected(MINIMIND3_CHECKPOINTS, name)
    assert model.config.model_family == "minimind3" and model.config.qk_norm
    with torch.no_grad():
        assert max_diff(at_columns(model(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL


@pytest.mark.parametrize("name", MINIMIND3_MODELS)
def test_minimind3_kv_cache_decode_matches_original(name):
    model, ref = minimind3_model(name), expected(MINIMIND3_CHECKPOINTS, name)
    assert max_diff(at_columns(cached_decode_logits(model, ref), ref), ref["decode_logits"]) <= TOL


@pytest.mark.parametrize("name", MINIMIND3_MODELS)
def test_minimind3_train_mode_aux_loss_matches_original(name):
    model, ref = minimind3_model(name), expected(MINIMIND3_CHECKPOINTS, name)
    model.train()
    torch.manual_seed(7)
    aux = model(ref["input_ids"]).aux_loss
    assert abs(aux.item() - float(ref["train_aux_loss_seed7"])) <= 1e-5
    if model.config.use_moe:
        assert aux.item() > 1e-3  # a real loss, not the dense models' 0


def test_minimind3_yarn_changes_the_logits():
    """The YaRN fixture is the dense weights with YaRN on: the rotary table, hence the logits, differ."""
    dense, yarn = expected(MINIMIND3_CHECKPOINTS, "dense3_tiny"), expected(MINIMIND3_CHECKPOINTS, "dense3_yarn_tiny")
    assert torch.equal(dense["input_ids"], yarn["input_ids"]) and max_diff(dense["logits"], yarn["logits"]) > 1e-3
    model = minimind3_model("dense3_yarn_tiny")
    half = model.config.head_dim // 2
    cos, sin = model.model.rotary_emb.cos[1, :half], model.model.rotary_emb.sin[1, half:]
    scale = torch.atan2(sin, cos) / (1e6 ** (-torch.arange(0, 16, 2).float() / 16))
    # fast pairs kept, slow pairs divided by the factor 16, a linear ramp between
    assert torch.allclose(scale, torch.tensor([1, 1, 0.6875, 0.375, 1 / 16, 1 / 16, 1 / 16, 1 / 16]), atol=1e-4)


@pytest.mark.parametrize("name", ["dense3_tiny", "moe3_tiny"])
def test_minimind3_family_recognised_from_its_config_fields(name):
    fields = json.loads((MINIMIND3_CHECKPOINTS / f"{name}_config.json").read_text())
    assert "model_family" not in fields
    config = MiniMindConfig(**fields)
    assert (config.model_family, config.family_name, config.qk_norm, config.n_shared_experts) == \
           ("minimind3", "MiniMind-3", True, 0)
    assert (config.num_experts, config.router_aux_loss_coef, config.head_dim) == (4, 5e-4, 16)
    for minimind2 in ("dense_tiny", "moe_tiny"):
        seed_fields = json.loads((SEED_CHECKPOINTS / f"{minimind2}_config.json").read_text())
        assert MiniMindConfig(**seed_fields).model_family == "minimind2"


def test_minimind3_defaults_are_the_originals():
    c = MiniMindConfig(model_family="minimind3")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (768, 8, 8, 4, 96)
    assert c.intermediate_size == 2432 == 64 * math.ceil(768 * math.pi / 64)
    assert (c.rms_norm_eps, c.qk_norm, c.num_experts_per_tok, c.num_experts, c.n_shared_experts) == (1e-6, True, 1, 4, 0)
    assert (c.router_aux_loss_coef, c.norm_topk_prob, c.moe_intermediate_size, c.inference_rope_scaling) == (5e-4, True, 2432, False)
    assert c.yarn_parameters == {"factor": 16, "beta_fast": 32, "beta_slow": 1,
                                 "original_max_position_embeddings": 2048, "attention_factor": 1.0}
    model = MiniMindForCausalLM(MiniMindConfig(model_family="minimind3", hidden_size=64, num_attention_heads=4,
                                               num_hidden_layers=1, use_moe=True))
    names = set(model.state_dict())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight",
            "model.layers.0.mlp.gate.weight"} <= names
    assert not any("shared_experts" in name for name in names)


def test_minimind3_config_json_uses_its_names_and_round_trips(tmp_path):
    model = minimind3_model("moe3_tiny")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_family"] == "minimind3" and saved["num_experts"] == 4 and saved["router_aux_loss_coef"] == 5e-4
    assert not {"n_routed_experts", "aux_loss_alpha", "seq_aux"} & set(saved)
    ref = expected(MINIMIND3_CHECKPOINTS, "moe3_tiny")
    for reloaded in (load_model(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path).eval()):
        assert reloaded.config.model_family == "minimind3"
        with torch.no_grad():
            assert max_diff(at_columns(reloaded(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL
    # and MiniMind2's file keeps MiniMind2's names
    fixture_model(SEED_CHECKPOINTS, "moe_tiny").save_pretrained(tmp_path / "mm2")
    saved = json.loads((tmp_path / "mm2" / "config.json").read_text())
    assert saved["model_family"] == "minimind2" and saved["n_routed_experts"] == 4 and "num_experts" not in saved


@pytest.mark.parametrize("name", ["dense3_tiny", "moe3_tiny"])
def test_minimind3_bare_pth_recognised_from_tensor_names(name, tmp_path):
    """No config: the q/k norms say MiniMind-3, and their width gives head_dim, hence every head count."""
    extra = {"num_experts_per_tok": 2} if name == "moe3_tiny" else {}  # not visible in any tensor
    model, ref = load_model(MINIMIND3_CHECKPOINTS / f"{name}_fp16.pth", **extra), expected(MINIMIND3_CHECKPOINTS, name)
    config = model.config
    assert (config.model_family, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.rms_norm_eps) == ("minimind3", 4, 2, 16, 1e-6)
    assert describe_model(config).startswith("MiniMind-3, " + ("MoE 4 experts (top-2)" if extra else "dense"))
    with torch.no_grad():
        assert max_diff(at_columns(model(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL
    # a config.json beside it that names no family (and no MiniMind-3 field): the tensors decide
    (tmp_path / "model.pth").write_bytes((MINIMIND3_CHECKPOINTS / f"{name}_fp16.pth").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minimind", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                                      "intermediate_size": 256, "use_moe": bool(extra), **extra}))
    assert load_model(tmp_path / "model.pth").config.model_family == "minimind3"
    assert load_model(SEED_CHECKPOINTS / "dense_tiny_fp16.pth", num_attention_heads=4).config.model_family == "minimind2"


def test_wrong_family_is_refused_with_a_hint():
    config = MiniMindConfig(model_family="minimind2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=2, intermediate_size=256)
    with pytest.raises(CheckpointError, match='unexpected 4: .*q_norm.*The checkpoint is a MiniMind-3 model but the '
                                              'config says MiniMind2; set "model_family": "minimind3"'):
        load_model(MINIMIND3_CHECKPOINTS / "dense3_tiny_fp16.pth", config=config)


def test_minimind3_router_renormalises_top1_and_balances_like_switch():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    for top_k in (1, 2):
        config = MiniMindConfig(model_family="minimind3", hidden_size=16, num_attention_heads=2, use_moe=True,
                                num_experts_per_tok=top_k)
        gate = MiniMind3Gate(config).train()
        torch.nn.init.normal_(gate.weight)
        idx, weight, aux = gate(x)
        assert torch.allclose(weight.sum(-1), torch.ones(12))  # even one expert gets weight 1
        scores = (x.reshape(-1, 16) @ gate.weight.T).softmax(-1)
        routed = torch.stack([(idx == e).float().sum() for e in range(4)]) / 12  # tokens per expert / N
        assert abs(aux.item() - 5e-4 * 4 * (routed * scores.mean(0)).sum().item()) < 1e-8
    raw = MiniMind3Gate(MiniMindConfig(model_family="minimind3", hidden_size=16, num_attention_heads=2, use_moe=True,
                                       norm_topk_prob=False))
    torch.nn.init.normal_(raw.weight)
    _, weight, _ = raw(x)
    assert torch.allclose(weight[:, 0], (x.reshape(-1, 16) @ raw.weight.T).softmax(-1).max(-1).values)


def test_minimind3_odd_head_counts_run_and_decode():
    """head_dim is its own field: heads * head_dim need not equal hidden_size (hidden // heads when unset)."""
    for heads, kv_heads, head_dim in ((3, 1, 16), (5, 5, None), (6, 2, 8)):
        config = MiniMindConfig(model_family="minimind3", hidden_size=64, num_attention_heads=heads,
                                num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=1, vocab_size=40)
        model = MiniMindForCausalLM(config).eval()
        assert model.model.layers[0].self_attn.q_proj.weight.shape == (heads * config.head_dim, 64)
        ids = torch.randint(0, 40, (1, 9))
        with torch.no_grad():
            full = model(ids).logits
            out = model(ids[:, :5], use_cache=True)
            step = model(ids[:, 5:], cache=out.cache, use_cache=True).logits
        assert max_diff(torch.cat([out.logits, step], 1), full) <= TOL
