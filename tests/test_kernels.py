"""The speed kernels against their plain formulas: same losses, same gradients, same optimizer step."""
import copy

import pytest
import torch
import torch.nn.functional as F

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.data.batching import collate
from minimind.model.kernels import next_token_loss, next_token_losses, rms_norm
from minimind.model.model import RotaryEmbedding, apply_rotary_embedding, precompute_rotary_frequencies
from minimind.training.stages.stage import count_labelled_tokens, language_model_loss

REL = 1e-4


def tiny_model(**overrides):
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    return MiniMindForCausalLM(config)


def batch(vocab=6400, shape=(3, 17), prompts=False):
    """prompts: every row's first 12 tokens unlabelled (a conversation's prompt: most rows have no
    target, so the losses compute only the labelled rows' logits, kernels.labelled_rows)."""
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    if prompts:
        labels[:, :12] = -100
    return ids, labels


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def plain_loss(logits, labels, reduction="mean"):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("prompts", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 1024])
@pytest.mark.parametrize("num_items", [None, 100])
def test_chunked_loss_and_gradients_match_full_logits(chunk_size, num_items, prompts):
    hidden = torch.randn(3, 17, 64, requires_grad=True)
    weight = (torch.randn(6400, 64) * 0.05).requires_grad_()
    _, labels = batch(prompts=prompts)
    logits = hidden @ weight.t()
    plain = plain_loss(logits, labels) if num_items is None else plain_loss(logits, labels, "sum") / num_items
    plain_grads = torch.autograd.grad(2.5 * plain, (hidden, weight))
    fast = next_token_loss(hidden, weight, labels, num_items, chunk_size)
    fast_grads = torch.autograd.grad(2.5 * fast, (hidden, weight))
    assert abs(fast.item() - plain.item()) <= REL * abs(plain.item())
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        assert relative(fast_grad, plain_grad) <= REL


@pytest.mark.parametrize("prompts", [False, True])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_per_token_losses_and_their_gradients_match_full_logits(chunk_size, prompts):
    """The per-token path (DPO, eval) under an arbitrary use of its result: backward recomputes chunks."""
    hidden = torch.randn(3, 17, 64, requires_grad=True)
    weight = (torch.randn(6400, 64) * 0.05).requires_grad_()
    _, labels = batch(prompts=prompts)
    upstream = torch.randn(3, 17)
    plain = F.cross_entropy((hidden @ weight.t()).transpose(1, 2)[..., :-1], labels[:, 1:], ignore_index=-100,
                            reduction="none")
    plain = torch.cat([plain, torch.zeros(3, 1)], dim=1)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), (hidden, weight))
    fast = next_token_losses(hidden, weight, labels, chunk_size)
    fast_grads = torch.autograd.grad((fast * upstream).sum(), (hidden, weight))
    assert relative(fast, plain) <= REL
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        assert relative(fast_grad, plain_grad) <= REL


def test_forward_loss_without_grad_is_the_same_number():
    model = tiny_model().eval()
    ids, labels = batch()
    with torch.no_grad():
        out = model(ids, labels=labels)
        assert abs(out.loss.item() - plain_loss(out.logits, labels).item()) <= REL * out.loss.item()
        assert model(ids, labels=labels, return_logits=False).logits is None


@pytest.mark.parametrize("use_moe", [False, True])
def test_model_gradients_match_plain_step(use_moe):
    fast_model = tiny_model(use_moe=use_moe)
    plain_model = copy.deepcopy(fast_model)
    ids, labels = batch()
    out = plain_model(ids)
    plain = plain_loss(out.logits, labels)
    (plain + out.aux_loss).backward()
    fast = fast_model(ids, labels=labels, return_logits=False)
    (fast.loss + fast.aux_loss).backward()
    assert abs(fast.loss.item() - plain.item()) <= REL * plain.item()
    assert abs(fast.aux_loss.item() - out.aux_loss.item()) <= REL * max(out.aux_loss.item(), 1e-6)
    for (name, fast_param), plain_param in zip(fast_model.named_parameters(), plain_model.parameters()):
        assert relative(fast_param.grad, plain_param.grad) <= REL, name


def test_loss_after_a_fused_adamw_step_matches_plain_adamw_step():
    fast_model = tiny_model()
    plain_model = copy.deepcopy(fast_model)
    ids, labels = batch()
    fast_optimizer = torch.optim.AdamW(fast_model.parameters(), lr=1e-3, fused=True)
    first = fast_model(ids, labels=labels, return_logits=False).loss
    first.backward()
    fast_optimizer.step()
    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    plain_first = plain_loss(plain_model(ids).logits, labels)
    plain_first.backward()
    optimizer.step()
    assert abs(first.item() - plain_first.item()) <= REL * plain_first.item()
    with torch.no_grad():
        after, plain_after = fast_model(ids, labels=labels).loss, plain_loss(plain_model(ids).logits, labels)
    assert after < first  # the step learned something
    assert abs(after.item() - plain_after.item()) <= REL * plain_after.item()


def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch():
    """Token-weighted accumulation: answers of uneven length weigh by their tokens, as in one batch."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(2)
    items = []
    for length, answer_from in ((20, 3), (6, 4), (13, 2), (9, 8)):
        ids = torch.randint(3, 6400, (length,), generator=generator)
        labels = ids.clone()
        labels[:answer_from] = -100
        items.append({"input_ids": ids, "labels": labels})
    whole = collate(items)
    loss, _ = language_model_loss(model, whole, count_labelled_tokens(whole))
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    micro = [collate(items[:1]), collate(items[1:])]
    normalizer = sum(count_labelled_tokens(b) for b in micro)
    for b in micro:
        language_model_loss(model, b, normalizer)[0].backward()
    for name, p in model.named_parameters():
        assert relative(p.grad, expected[name]) <= REL, name
    # averaging micro-batch means instead would weigh the long first sequence like the three short ones
    model.zero_grad()
    for b in micro:
        (language_model_loss(model, b, count_labelled_tokens(b))[0] / len(micro)).backward()
    assert relative(model.lm_head.weight.grad, expected["model.embed_tokens.weight"]) > 1e-2


def reference_rms_norm(x, weight, eps):
    """The three-line RMSNorm of the original MiniMind, differentiated by autograd."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def test_rms_norm_in_half_precision_rounds_in_each_familys_order():
    """MiniMind2 casts the normalised x back to bfloat16 and then scales; MiniMind-3 scales in float32
    and casts the product: bit-for-bit each original's formula, on both the training and inference paths."""
    x = torch.randn(4, 64).to(torch.bfloat16)
    weight = (1 + torch.randn(64) * 0.3).to(torch.bfloat16)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    minimind2, minimind3 = weight * normed.type_as(x), (weight * normed).type_as(x)
    assert not torch.equal(minimind2, minimind3)  # the orders do differ in bfloat16
    for expected, scale_in_float32 in ((minimind2, False), (minimind3, True)):
        with torch.no_grad():
            assert torch.equal(rms_norm(x, weight, 1e-6, scale_in_float32), expected)
        trained = rms_norm(x.requires_grad_(), weight, 1e-6, scale_in_float32)
        assert torch.equal(trained.detach(), expected)
        x = x.detach()


def reference_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rms_norm_backward_matches_autograd():
    x = torch.randn(3, 5, 64, requires_grad=True)
    weight = (1 + torch.randn(64) * 0.1).requires_grad_()
    grad_out = torch.randn(3, 5, 64)
    expected = reference_rms_norm(x, weight, 1e-5)
    expected_grads = torch.autograd.grad(expected, (x, weight), grad_out)
    got = rms_norm(x, weight, 1e-5)
    got_grads = torch.autograd.grad(got, (x, weight), grad_out)
    assert relative(got, expected) <= REL
    for g, e in zip(got_grads, expected_grads):
        assert relative(g, e) <= REL
    with torch.no_grad():  # the inference path: the same numbers without the autograd.Function
        assert relative(rms_norm(x, weight, 1e-5), expected) <= 1e-6


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
