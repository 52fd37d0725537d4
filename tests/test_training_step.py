"""The fast training step against the plain eager float32 one: same loss, same gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.model import RMSNorm, RotaryEmbedding, apply_rotary_embedding, precompute_rotary_frequencies
from minimind.training_step import causal_lm_loss, make_optimizer, model_loss, training_step

REL = 1e-4


def tiny_model(**overrides):
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    return MiniMindForCausalLM(config)


def batch(vocab=6400, shape=(3, 17)):
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    return ids, labels


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_chunked_loss_and_gradients_match_full_logits(chunk_size):
    hidden = torch.randn(3, 17, 64, requires_grad=True)
    weight = (torch.randn(6400, 64) * 0.05).requires_grad_()
    _, labels = batch()
    logits = hidden @ weight.t()
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    plain_grads = torch.autograd.grad(2.5 * plain, (hidden, weight))
    fast = causal_lm_loss(hidden, weight, labels, chunk_size)
    fast_grads = torch.autograd.grad(2.5 * fast, (hidden, weight))
    assert abs(fast.item() - plain.item()) <= REL * abs(plain.item())
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        assert relative(fast_grad, plain_grad) <= REL


def test_chunked_loss_without_grad_is_the_same_number():
    model = tiny_model()
    ids, labels = batch()
    with torch.no_grad():
        loss, _ = model_loss(model, ids, labels, chunk_size=8)
        assert abs(loss.item() - model(ids, labels=labels).loss.item()) <= REL * loss.item()


@pytest.mark.parametrize("use_moe", [False, True])
def test_model_gradients_match_plain_step(use_moe):
    fast_model = tiny_model(use_moe=use_moe)
    plain_model = copy.deepcopy(fast_model)
    ids, labels = batch()
    out = plain_model(ids, labels=labels)
    (out.loss + out.aux_loss).backward()
    loss, aux_loss = model_loss(fast_model, ids, labels, chunk_size=16)
    (loss + aux_loss).backward()
    assert abs(loss.item() - out.loss.item()) <= REL * out.loss.item()
    assert abs(aux_loss.item() - out.aux_loss.item()) <= REL * max(out.aux_loss.item(), 1e-6)
    for (name, fast_param), plain_param in zip(fast_model.named_parameters(), plain_model.parameters()):
        assert relative(fast_param.grad, plain_param.grad) <= REL, name


def test_loss_after_a_step_matches_plain_adamw_step():
    fast_model = tiny_model()
    plain_model = copy.deepcopy(fast_model)
    ids, labels = batch()
    first = training_step(fast_model, ids, labels, make_optimizer(fast_model.parameters(), lr=1e-3))
    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    plain_first = plain_model(ids, labels=labels).loss
    plain_first.backward()
    optimizer.step()
    assert abs(first.item() - plain_first.item()) <= REL * plain_first.item()
    with torch.no_grad():
        after, plain_after = fast_model(ids, labels=labels).loss, plain_model(ids, labels=labels).loss
    assert after < first  # the step learned something
    assert abs(after.item() - plain_after.item()) <= REL * plain_after.item()


def reference_rms_norm(x, weight, eps):
    """The three-line RMSNorm of the original MiniMind, differentiated by autograd."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def reference_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rms_norm_backward_matches_autograd():
    x = torch.randn(3, 5, 64, requires_grad=True)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.add_(torch.randn(64) * 0.1)
    grad_out = torch.randn(3, 5, 64)
    expected = reference_rms_norm(x, norm.weight, norm.eps)
    expected_grads = torch.autograd.grad(expected, (x, norm.weight), grad_out)
    got = norm(x)
    got_grads = torch.autograd.grad(got, (x, norm.weight), grad_out)
    assert relative(got, expected) <= REL
    for g, e in zip(got_grads, expected_grads):
        assert relative(g, e) <= REL


def test_rotary_with_signed_sin_matches_rotate_half():
    cos, sin = precompute_rotary_frequencies(16, 32, 1e6)
    positions = torch.arange(32).expand(2, -1)
    rotary = RotaryEmbedding(MiniMindConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32))
    signed_cos, signed_sin = rotary(positions, torch.float32)
    q, k = torch.randn(2, 4, 32, 16), torch.randn(2, 2, 32, 16)
    got_q, got_k = apply_rotary_embedding(q, k, signed_cos, signed_sin)
    table_cos, table_sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    assert relative(got_q, reference_rotary(q, table_cos, table_sin)) <= 1e-6
    assert relative(got_k, reference_rotary(k, table_cos, table_sin)) <= 1e-6
