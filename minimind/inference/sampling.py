"""Choosing the next token from the model's logits: greedy, or sampled with temperature, top-k,
top-p and a repetition penalty. Every decoder here (generate, chat, eval, GRPO's rollouts, the
server's batch) picks its tokens through `pick_next_token`.
"""
import torch

# Top-p looks for the nucleus among this many likeliest tokens first: a top-k of 256 costs ~1/30 of
# sorting a 6,400-token vocabulary on a CPU (sort 310 us, topk 11 us), and the nucleus of a trained
# model is far narrower. A row whose nucleus reaches past them is sorted whole, so the result is exact.
NUCLEUS_CANDIDATES = 256


def pick_next_token(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None,
                    uniforms=None):
    """logits (B, vocab) of the last position -> next token ids (B,).

    repetition_penalty p (CTRL's): for tokens already in the row (`seen`, bool (B, vocab)), a
        positive logit is divided by p and a negative one multiplied by p, so p > 1 discourages
        repeating them.
    temperature T: logits / T before the softmax; T < 1 sharpens the distribution, T > 1 flattens
        it, T = 0 means greedy (argmax), deterministic.
    top_k k: sample only among the k most likely tokens (0 = all).
    top_p p: sample only among the smallest set of most likely tokens whose probabilities add up
        to p (nucleus sampling; 1.0 = all). Cuts the long tail of unlikely tokens, adaptively.
    The draw: one uniform number u per row, from `generator` (or `uniforms`, (B,), when the caller
    draws them, as the server does from each request's own generator), and the token where the
    kept probabilities' running sum passes u times their total (inverse transform sampling).
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs, token_ids = candidate_probabilities(logits / temperature, top_k, top_p)
    if top_p < 1.0:
        # Drop a token when the tokens before it already cover top_p; the first one always stays.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    running_sum = probs.cumsum(dim=-1)
    choice = torch.searchsorted(running_sum, (uniforms.to(logits.device) * running_sum[:, -1])[:, None])
    choice = choice.clamp_(max=probs.shape[-1] - 1)
    return choice.squeeze(-1) if token_ids is None else token_ids.gather(-1, choice).squeeze(-1)


def candidate_probabilities(logits, top_k, top_p):
    """The tokens that top-k allows, with their probabilities (under the top-k distribution), sorted
    from the likeliest when top-p needs the order: (probs (B, C), their token ids (B, C)), or
    (probs (B, vocab), None) when every token in vocabulary order will do."""
    vocab = logits.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    if top_p >= 1.0:
        if k == vocab:
            return logits.softmax(dim=-1), None
        values, token_ids = logits.topk(k, dim=-1)
        return values.softmax(dim=-1), token_ids
    values, token_ids = logits.topk(min(k, NUCLEUS_CANDIDATES), dim=-1)
    if k <= NUCLEUS_CANDIDATES:
        return values.softmax(dim=-1), token_ids
    allowed = logits.topk(k, dim=-1).values if k < vocab else logits
    probs = (values - allowed.logsumexp(dim=-1, keepdim=True)).exp()
    if bool((probs.sum(dim=-1) < top_p).any()):  # a nucleus wider than the candidates: all of top-k, sorted
        values, token_ids = logits.topk(k, dim=-1)
        probs = values.softmax(dim=-1)
    return probs, token_ids
