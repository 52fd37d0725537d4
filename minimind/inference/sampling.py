"""Choosing the next token from the model's logits: greedy, or sampled with temperature, top-k,
top-p and a repetition penalty. Every decoder here (generate, chat, eval, GRPO's rollouts, the
server's batch) picks its tokens through `pick_next_token`.
"""
import torch


def pick_next_token(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """logits (B, vocab) of the last position -> next token ids (B,).

    repetition_penalty p (CTRL's): for tokens already in the row (`seen`, bool (B, vocab)), a
        positive logit is divided by p and a negative one multiplied by p, so p > 1 discourages
        repeating them.
    temperature T: logits / T before the softmax; T < 1 sharpens the distribution, T > 1 flattens
        it, T = 0 means greedy (argmax), deterministic.
    top_k k: sample only among the k most likely tokens (0 = all).
    top_p p: sample only among the smallest set of most likely tokens whose probabilities add up
        to p (nucleus sampling; 1.0 = all). Cuts the long tail of unlikely tokens, adaptively.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first one always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

