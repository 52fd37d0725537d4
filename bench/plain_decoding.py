"""The decoder as it was before the prepared weights and the slot cache (issue 30): the model's own
forward (model/model.py, the textbook) over its KVCache, prompts left-padded with an attention mask.
bench/generate_speed.py and bench/grpo_rollouts.py measure minimind's decoder against it in the
same process: it is the "before" of their ratios.
"""
import torch

from minimind.inference.decoding import left_pad
from minimind.inference.sampling import pick_next_token
from minimind.model.model import KVCache


@torch.inference_mode()
def plain_generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, eos_ids=(), generator=None):
    """prompts: lists of ids -> the new tokens of each (eos excluded), sampled as decoding.decode does."""
    model.eval()
    input_ids, attention_mask = left_pad(prompts, model.config.pad_token_id or 0)
    if bool(attention_mask.all()):
        attention_mask = None  # positions follow from the cache length
    batch = input_ids.shape[0]
    cache = KVCache(capacity=input_ids.shape[1] + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1).logits
    outputs, finished = [[] for _ in range(batch)], [False] * batch
    for step in range(max_new_tokens):
        token = pick_next_token(logits[:, -1], None, temperature, 0, top_p, 1.0, generator)
        for row, value in enumerate(token.tolist()):
            if not finished[row]:
                finished[row] = value in eos_ids
                if not finished[row]:
                    outputs[row].append(value)
        if all(finished) or step == max_new_tokens - 1:
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits = model(token[:, None], attention_mask=attention_mask, cache=cache, use_cache=True,
                       logits_to_keep=1).logits
    return outputs
