"""Choosing the next token from the model's logits: greedy, or sampled with temperature, top-k,
top-p and a repetition penalty. Every decoder here (generate, chat, eval, GRPO's rollouts, the
server's batch) picks its tokens through `pick_next_token`.
"""
import math

import torch

# Top-p looks for the nucleus among this many likeliest tokens first: a top-k of 256 costs ~1/30 of
# sorting a 6,400-token vocabulary on a CPU (sort 310 us, topk 11 us), and the nucleus of a trained
# model is far narrower. A row whose nucleus reaches past them is cut without a sort (nucleus_mask).
NUCLEUS_CANDIDATES = 256
# Probability bins of nucleus_mask: the bin where the nucleus ends holds a few tokens of a
# 6,400-token vocabulary, even when the distribution is nearly flat (an untrained model).
NUCLEUS_BINS = 1024
# greedy_tokens looks for a row's greatest logit in blocks of this many: torch's argmax over a CPU row
# is a scalar loop (8 rows of 6,400: 165 us on one thread) where amax is vectorized.
GREEDY_BLOCK = 128


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
    kept probabilities' running sum passes u times their total (inverse transform sampling). Each
    row's token depends on its own logits and u alone, not on the other rows of the batch.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature <= 0:
        return greedy_tokens(logits)
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    uniforms = uniforms.to(logits.device)
    logits = logits / temperature
    probs, token_ids, wide = candidate_probabilities(logits, top_k, top_p)
    if probs is None:  # every row's nucleus reaches past the candidates
        return draw_in_wide_nucleus(logits, top_p, uniforms)
    tokens = draw(probs, token_ids, uniforms)
    if wide is not None:
        tokens[wide] = draw_in_wide_nucleus(logits[wide], top_p, uniforms[wide])
    return tokens


def greedy_tokens(logits):
    """logits (B, vocab) -> each row's argmax (B,), the first of equal greatest (and the first NaN)
    as torch.argmax gives it. On a CPU, for several rows, found in two small steps: each block of
    GREEDY_BLOCK logits' greatest (amax, vectorized), the first block that holds the row's greatest,
    then the argmax within that block: 8 rows of 6,400 in 40 us against argmax's 165, 64 rows in 149
    against 1,132 (one thread). One row, or a GPU, goes to argmax itself."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or rows == 1 or vocab <= GREEDY_BLOCK:
        return logits.argmax(dim=-1)
    blocks = -(-vocab // GREEDY_BLOCK)
    if vocab % GREEDY_BLOCK:  # the last block filled with -inf, which no logit is below
        logits = torch.cat([logits, logits.new_full((rows, blocks * GREEDY_BLOCK - vocab), -math.inf)], dim=-1)
    tiles = logits.reshape(rows, blocks, GREEDY_BLOCK)
    block = tiles.amax(dim=-1).argmax(dim=-1)
    within = tiles.gather(1, block.view(rows, 1, 1).expand(rows, 1, GREEDY_BLOCK)).squeeze(1).argmax(dim=-1)
    return block * GREEDY_BLOCK + within


def draw_in_wide_nucleus(logits, top_p, uniforms):
    """Rows whose nucleus reaches past the candidates: drawn over the whole vocabulary, unsorted, the
    nucleus cut by nucleus_mask."""
    full = logits.softmax(dim=-1)
    return draw(full.masked_fill_(~nucleus_mask(full, top_p), 0.0), None, uniforms)


def draw(probs, token_ids, uniforms):
    """Inverse transform sampling: per row, the first token where the running sum of `probs` passes
    u times their total; token_ids maps columns to tokens (None: the columns are the tokens)."""
    running_sum = probs.cumsum(dim=-1)
    choice = torch.searchsorted(running_sum, (uniforms * running_sum[:, -1])[:, None])
    choice = choice.clamp_(max=probs.shape[-1] - 1)
    return choice.squeeze(-1) if token_ids is None else token_ids.gather(-1, choice).squeeze(-1)


def candidate_probabilities(logits, top_k, top_p):
    """The tokens that top-k and top-p allow, with their probabilities (under the top-k distribution;
    0 for those outside the nucleus), sorted from the likeliest where top-p needs the order:
    (probs (B, C), their token ids (B, C) or None when C is the vocabulary in order, wide). wide: None,
    or a bool (B,) of the rows whose nucleus is wider than the NUCLEUS_CANDIDATES likeliest tokens
    (with top_k 0); their probs here are to be replaced (pick_next_token cuts them with nucleus_mask).
    (None, None, None) when every row's nucleus is surely that wide (surely_wider): the candidates
    are not looked for."""
    vocab = logits.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    if top_p >= 1.0:
        if k == vocab:
            return logits.softmax(dim=-1), None, None
        values, token_ids = logits.topk(k, dim=-1)
        return values.softmax(dim=-1), token_ids, None
    log_total = logits.logsumexp(dim=-1, keepdim=True) if k == vocab else None
    if log_total is not None and bool(surely_wider(logits, log_total, top_p).all()):
        return None, None, None
    values, token_ids = logits.topk(min(k, NUCLEUS_CANDIDATES), dim=-1)
    if k <= NUCLEUS_CANDIDATES:
        return within_nucleus(values.softmax(dim=-1), top_p), token_ids, None
    if log_total is None:
        log_total = logits.topk(k, dim=-1).values.logsumexp(dim=-1, keepdim=True)
    probs = (values - log_total).exp()
    wide = probs.sum(dim=-1) < top_p
    if not bool(wide.any()):
        return within_nucleus(probs, top_p), token_ids, None
    if k == vocab:
        return within_nucleus(probs, top_p), token_ids, wide
    values, token_ids = logits.topk(k, dim=-1)  # a nucleus wider than the candidates: all of top-k, sorted
    return within_nucleus(values.softmax(dim=-1), top_p), token_ids, None


def surely_wider(logits, log_total, top_p):
    """Rows whose nucleus is wider than the NUCLEUS_CANDIDATES likeliest tokens, told without finding
    them: even that many tokens of the likeliest one's probability hold less than top_p (with a margin
    of 0.1% for rounding, so that no row is called wide here that the candidates' own sum would not).
    A near-flat distribution (an untrained model's) is such a row; finding the candidates, a top-k of
    256 over 6,400 tokens, cost 8 such rows 40% of their draw (2 threads: 0.95 ms, 0.53 without)."""
    return (logits.amax(dim=-1) - log_total.squeeze(-1)) < math.log(top_p / (NUCLEUS_CANDIDATES * 1.001))


def within_nucleus(sorted_probs, top_p):
    """Probabilities sorted from the likeliest, 0 from where the ones before already cover top_p (the
    first always stays)."""
    return sorted_probs.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p, 0.0)


def nucleus_mask(probs, top_p, bins=NUCLEUS_BINS):
    """Which tokens of probs (B, vocab) form the top-p nucleus, without sorting the vocabulary: a
    token is in it when the tokens likelier than it hold less than top_p. Each row's probabilities go
    into `bins` bins of equal width between its least and greatest; every token of a bin above the
    one where the likelier mass reaches top_p is in, every token below is out, and only the tokens
    of that one bin are sorted. The same set as a full sort's (where two probabilities tie at the
    edge, either of them), in ~1/5 of its time for 8 rows of 6,400 tokens on a CPU."""
    low, high = probs.amin(dim=-1, keepdim=True), probs.amax(dim=-1, keepdim=True)
    bin_of = ((probs - low) * ((bins - 1) / (high - low).clamp_min(1e-30))).long().clamp_(0, bins - 1)
    # Bin masses in float64, as a CPU cumsum adds; MPS has no float64.
    exact = torch.float32 if probs.device.type == "mps" else torch.float64
    mass = probs.new_zeros(probs.shape[0], bins, dtype=exact).scatter_add_(-1, bin_of, probs.to(exact))
    at_or_above = mass.flip(-1).cumsum(dim=-1).flip(-1)  # the mass of bin j and every bin above it
    above = at_or_above - mass
    boundary = ((above < top_p) & (at_or_above >= top_p)).to(torch.uint8).argmax(dim=-1, keepdim=True)
    inside = bin_of > boundary
    in_boundary = bin_of == boundary
    count = int(in_boundary.sum(dim=-1).max())
    values, token_ids = torch.where(in_boundary, probs, -1.0).topk(count, dim=-1)  # the boundary bin, sorted
    real = values >= 0
    likelier = above.gather(-1, boundary) + values.clamp_min(0).cumsum(dim=-1) - values.clamp_min(0)
    return inside.scatter_(-1, token_ids, inside.gather(-1, token_ids) | (real & (likelier < top_p)))
