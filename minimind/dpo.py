"""Direct Preference Optimization: learn from pairs (prompt, chosen answer, rejected answer).

For a policy pi and a frozen reference pi_ref (the starting weights), with log-probabilities of
whole responses summed over their tokens:

    r(y) = beta * (log pi(y | x) - log pi_ref(y | x))          the implicit reward
    loss = -log sigmoid(r(chosen) - r(rejected))

The policy is pushed to raise the chosen answer relative to the reference more than the rejected
one; beta sets how far it may drift from the reference (small beta: further).

Reference: with LoRA, the base model with its adapters switched off (no extra memory); without
LoRA, a frozen copy of the starting weights (one more model in memory, computed alongside each
batch, so nothing has to be precomputed or cached).
"""
import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def response_log_probs(logits, labels):
    """Sum over response tokens of log p(token | prefix): logits (B, S, V), labels (B, S) with -100
    outside the response. Returns (B,)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """The sigmoid DPO loss and its diagnostics, from summed response log-probabilities (each (B,))."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    # preference accuracy: chosen scored above rejected; a tie (as at the start, when the policy
    # is the reference) counts as a coin flip, so an untrained policy scores 50%
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    metrics = {"loss": loss.detach(), "margin": margin.mean().detach(), "accuracy": accuracy.detach()}
    return loss, metrics


def make_reference(model, args):
    """The frozen reference: None under LoRA (adapters are switched off instead), else a copy."""
    if getattr(model, "peft_config", None):
        return None
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def dpo_step_loss(model, batch, beta, reference=None):
    """batch: collate() of DPO items, chosen rows first then rejected rows."""
    half = batch["input_ids"].shape[0] // 2
    # right padding + causal attention: pads never influence real tokens, so no mask is needed
    policy = response_log_probs(model(batch["input_ids"]).logits, batch["labels"])
    with torch.no_grad():
        if reference is None:
            was_training = model.training
            model.eval()  # the reference is deterministic: no dropout
            with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
                ref_logits = model(batch["input_ids"]).logits
            model.train(was_training)
        else:
            ref_logits = reference(batch["input_ids"]).logits
        ref = response_log_probs(ref_logits, batch["labels"])
    return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta)
