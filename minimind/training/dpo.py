"""Direct Preference Optimization: learn from pairs (prompt, chosen answer, rejected answer).

For a policy pi and a frozen reference pi_ref (the starting weights), with log-probabilities of
whole responses summed over their tokens:

    r(y) = beta * (log pi(y | x) - log pi_ref(y | x))          the implicit reward
    loss = -log sigmoid(r(chosen) - r(rejected))

The policy is pushed to raise the chosen answer relative to the reference more than the rejected
one; beta sets how far it may drift from the reference (small beta: further).

Reference: with LoRA, the base model with its adapters switched off (no extra memory); without
LoRA, a frozen copy of the starting weights (one more model in memory, computed alongside each
batch, so nothing has to be precomputed or cached). The log-probabilities come from the model's
`sequence_log_probs`, the same cross-entropy that pretraining and SFT minimise.
"""
import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .distributed import unwrap


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, normalizer=None):
    """The sigmoid DPO loss and its diagnostics, from summed response log-probabilities (each (B,)).

    Summed over the pairs and divided by `normalizer` (default: the number of pairs, the mean), so
    that micro-batches of one optimizer step add up to the mean over all their pairs."""
    normalizer = normalizer or len(policy_chosen)
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).sum() / normalizer
    # preference accuracy: chosen scored above rejected; a tie (as at the start, when the policy
    # is the reference) counts as a coin flip, so an untrained policy scores 50%
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).sum() / normalizer
    metrics = {"loss": loss.detach(), "margin": margin.sum().detach() / normalizer, "accuracy": accuracy.detach()}
    return loss, metrics


def make_reference(model):
    """The frozen reference: None under LoRA (adapters are switched off instead), else a copy."""
    if getattr(model, "peft_config", None):
        return None
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def response_log_probs(model, input_ids, labels, per_token=False):
    """Log-probabilities of the labelled (response) tokens, summed per sequence, (B,), or with
    per_token each token's, (B, S), through the model's forward (so that a DistributedDataParallel
    wrapper sees the call): the same cross-entropy as the loss (model.sequence_log_probs)."""
    reduction = "token" if per_token else "sequence"
    return -model(input_ids, labels=labels, loss_reduction=reduction, return_logits=False).loss


@torch.no_grad()
def reference_log_probs(model, reference, input_ids, labels, per_token=False):
    """Response log-probabilities under the reference (deterministic: eval mode, no dropout):
    summed per sequence, (B,), or with per_token each token's, (B, S) (GRPO's KL penalty)."""
    if reference is not None:
        return response_log_probs(reference, input_ids, labels, per_token)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        log_probs = response_log_probs(model, input_ids, labels, per_token)
    model.train(was_training)
    return log_probs


def dpo_batch_loss(model, batch, beta, reference=None, normalizer=None):
    """batch: collate() of DPO items, chosen rows first then rejected rows.

    Right padding + causal attention: pads never influence real tokens, so no mask is needed."""
    half = batch["input_ids"].shape[0] // 2
    policy = response_log_probs(model, batch["input_ids"], batch["labels"])
    ref = reference_log_probs(model, reference, batch["input_ids"], batch["labels"])
    return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta, normalizer)
