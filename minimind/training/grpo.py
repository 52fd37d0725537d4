"""GRPO: reinforcement learning from rewards that a program checks (Group Relative Policy Optimization).

For each prompt q, sample a group of G answers o_1..o_G from the current policy, score each with
the reward functions (rewards.py), r_i = sum_k w_k R_k(q, o_i), and compare them within the group:

    A_i = (r_i - mean(r)) / (std(r) + eps)                  the advantage (std over the group, eps 1e-4)

An answer better than its group's average is made more likely, a worse one less, token by token:

    ratio_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
    loss_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_clip, 1 + eps_clip) * A_i) + beta * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (the k3 estimator of KL(pi || pi_ref))

averaged over each answer's tokens, then over the G answers of a group, then over the prompts
(the original GRPO's normalisation: a short answer weighs as much as a long one). logp_t and ref_t
are log-probabilities of the sampled token under the policy and under the reference (the starting
weights; under LoRA the adapters switched off), both at temperature 1.

pi_old is the policy that sampled the answers. Here every sampled group is used for exactly one
optimizer step (its micro-batches all sample before the update), so pi_old is the current policy
itself: ratio = exp(logp - logp.detach()) is 1 in value, the clip never binds, and the gradient is
-A_i * grad logp_t, the plain policy gradient with a group baseline. The clip is written out (and
tested with other old log-probabilities) because it is what makes reusing samples for several
updates safe. A group whose answers all get the same reward (all right, or all wrong) has A = 0:
it teaches nothing but the KL term; the log counts these groups (no_signal). With --grpo_resample N
such a group is replaced by the group of another training prompt drawn at random, for up to N
rounds (DAPO's dynamic sampling, Yu et al. 2025): once most prompts are always answered right, the
step's gradient still comes from the prompts the model sometimes misses. --grpo_prioritize spends no
extra sampling on it: each prompt's last group is remembered, and a prompt whose last group had no
signal is replaced before its answers are sampled, by a training prompt drawn with weight 1 (never
sampled, or its last group had signal) or FLAT_WEIGHT (its last group had none, so it is still
revisited: the policy moves).
"""
import hashlib
import warnings

import numpy as np
import torch

from ..data.batching import collate
from ..data.tokenizer import load_tokenizer
from ..inference.decoding import generate, model_device
from ..model.kernels import IGNORE_INDEX, next_token_targets
from .distributed import unwrap
from .dpo import make_reference, reference_log_probs, response_log_probs
from .rewards import load_rewards, score_answers
from .stages.grpo import FLAT_WEIGHT

ADVANTAGE_EPS = 1e-4


class GRPOHelpers:
    """What the GRPO loss needs beside the model: the reference, the rewards, the tokenizer (to read
    answers as text), and the random generator that samples answers, whose state a checkpoint
    keeps (state_dict) so that a resumed run samples the same answers as an uninterrupted one."""

    def __init__(self, model, config, train_set):
        self.settings = config.grpo
        self.train_set = train_set  # the prompts --grpo_resample draws replacements from
        self.rewards = load_rewards(config.grpo.reward, device=model_device(model))
        self.reference = make_reference(model)
        self.tokenizer = load_tokenizer(config.data.tokenizer)  # the run's tokenizer (the trainer's own copy)
        self.generator = torch.Generator(device=model_device(model)).manual_seed(config.optim.seed)
        self.flat = torch.zeros(len(train_set), dtype=torch.bool)  # --grpo_prioritize: last group had no signal
        # a prompt's index in its file's dataset -> its place in train_set (a Subset of it beside a validation split)
        kept = torch.as_tensor(getattr(train_set, "indices", np.arange(len(train_set))))
        self.place = torch.full((int(kept.max()) + 1,), -1)
        self.place[kept] = torch.arange(len(kept))

    def state_dict(self):
        return {"generator": self.generator.get_state(), "flat": self.flat}

    def load_state_dict(self, state):
        """The saved generator state; one from another kind of device (a GPU run resumed on the CPU:
        the two keep different states) cannot be set, and sampling goes on from a seed derived from
        it instead, the same at every such resume."""
        if "flat" in state:  # checkpoints before --grpo_prioritize have none (and did not prioritize)
            self.flat.copy_(state["flat"])
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError:
            digest = hashlib.sha256(state["generator"].cpu().numpy().tobytes()).digest()
            self.generator.manual_seed(int.from_bytes(digest[:8], "little"))
            warnings.warn(f"GRPO's sampling generator was saved on another kind of device than "
                          f"{self.generator.device.type}: sampling continues from a new seed", stacklevel=2)


# ---------------------------------------------------------------- 1. sample a group of answers per prompt

def sample_answers(model, helpers, prompts, group_size, temperature):
    """group_size answers to each prompt (a list of token ids), drawn with the KV-cache generator
    from helpers.generator; temperature 0 answers greedily. Returns the answers' token ids (with
    the closing <|im_end|> when the answer ended, so the model learns where to stop), their texts
    (without it), in the order prompt 0's group, prompt 1's group, ..."""
    model = unwrap(model)  # sampling needs no gradient hooks
    tokenizer, was_training = helpers.tokenizer, model.training
    eos = tokenizer.eos_token_id
    out = generate(model, [ids for ids in prompts for _ in range(group_size)],
                   max_new_tokens=helpers.settings.grpo_max_new_tokens, temperature=temperature,
                   tokenizer=tokenizer, eos_token_id=eos, generator=helpers.generator,
                   quantize=helpers.settings.grpo_quantize)
    model.train(was_training)  # generation switches to eval mode
    answers = [ids + [eos] if reason == "eos" else ids for ids, reason in zip(out.token_ids, out.finish_reasons)]
    return answers, out.texts, torch.tensor([len(ids) for ids in out.token_ids], dtype=torch.float32)


class Groups:
    """Sampled groups: each prompt's group_size answers (token ids with the closing eos, texts,
    lengths) and their rewards (total and by reward), prompt 0's group first."""

    def __init__(self, model, helpers, prompts, records, group_size, temperature):
        answers, texts, self.lengths = sample_answers(model, helpers, prompts, group_size, temperature)
        self.answers, self.texts = list(answers), list(texts)
        repeated = [record for record in records for _ in range(group_size)]
        self.rewards, self.by_reward = score_answers(helpers.rewards, repeated, self.texts)
        self.group_size = group_size

    def flat(self):
        """Indices of the groups whose answers all got the same reward."""
        return all_equal(self.rewards.view(-1, self.group_size)).nonzero().flatten().tolist()

    def put(self, slot, other, index):
        """Group `index` of `other` in place of this one's group `slot`."""
        mine = slice(slot * self.group_size, (slot + 1) * self.group_size)
        theirs = slice(index * self.group_size, (index + 1) * self.group_size)
        self.answers[mine], self.texts[mine] = other.answers[theirs], other.texts[theirs]
        for values, others in [(self.lengths, other.lengths), (self.rewards, other.rewards),
                               *((self.by_reward[name], other.by_reward[name]) for name in self.by_reward)]:
            values[mine] = others[theirs]


def training_prompts(helpers, indices):
    """The token ids and records of the training prompts at these places in helpers.train_set."""
    items = [helpers.train_set[index] for index in indices]
    return [item["input_ids"].tolist() for item in items], [item["record"] for item in items]


def draw_prompts(helpers, weights, count):
    """`count` training prompt indices drawn with helpers.generator (so that a resumed run draws the
    same): by `weights` without replacement, or uniformly when weights is None."""
    generator = helpers.generator
    if weights is None:
        return torch.randint(len(helpers.train_set), (count,), generator=generator, device=generator.device).tolist()
    return torch.multinomial(weights.to(generator.device), count, generator=generator).tolist()


def prioritize(helpers, prompts, records, indices):
    """--grpo_prioritize: each prompt whose last group had no signal is replaced, in place in
    prompts, records and indices, by a training prompt drawn with weight 1 (never sampled, or its
    last group had signal) or FLAT_WEIGHT (none), the batch's own prompts left out. Returns the
    number of prompts replaced."""
    slots = [slot for slot, index in enumerate(indices) if helpers.flat[index]]
    weights = torch.where(helpers.flat, FLAT_WEIGHT, 1.0)
    weights[indices] = 0.0
    slots = slots[:int((weights > 0).sum())]  # a batch of nearly the whole set keeps some of its own
    if not slots:
        return 0
    picks = draw_prompts(helpers, weights, len(slots))
    new_prompts, new_records = training_prompts(helpers, picks)
    for slot, index, prompt, record in zip(slots, picks, new_prompts, new_records):
        prompts[slot], records[slot], indices[slot] = prompt, record, index
    return len(slots)


def resample_flat_groups(model, helpers, prompts, records, indices, groups, temperature):
    """Dynamic sampling: each group without signal (all its rewards equal) is replaced, in place in
    prompts, records, indices and groups, by a group sampled for a training prompt drawn at random
    (draw_prompts), for up to --grpo_resample rounds. Returns the number of groups replaced."""
    replaced = 0
    for _ in range(helpers.settings.grpo_resample):
        flat = groups.flat()
        if not flat:
            break
        picks = draw_prompts(helpers, None, len(flat))
        new_prompts, new_records = training_prompts(helpers, picks)
        fresh = Groups(model, helpers, new_prompts, new_records, groups.group_size, temperature)
        for index, slot in enumerate(flat):
            helpers.flat[indices[slot]] = True
            prompts[slot], records[slot], indices[slot] = new_prompts[index], new_records[index], picks[index]
            groups.put(slot, fresh, index)
        replaced += len(flat)
    return replaced


# ---------------------------------------------------------------- 2. advantages within each group

def all_equal(grouped):
    """(P, G) rewards -> (P,) True where a group's rewards are all the same (no signal)."""
    return (grouped == grouped[:, :1]).all(dim=1)


def group_advantages(rewards, group_size):
    """rewards (P * G,), each prompt's G answers consecutive -> advantages (P * G,) and each
    group's reward spread std(r) (P,) (the population std: 0 for a group of one).

    A group whose rewards are all equal gets exactly A = 0 and spread 0 (its float mean may be off
    by a rounding error, which eps would turn into a small but real push)."""
    grouped = rewards.view(-1, group_size)
    flat = all_equal(grouped).unsqueeze(1)
    spread = grouped.std(dim=1, correction=0, keepdim=True).masked_fill(flat, 0.0)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (spread + ADVANTAGE_EPS)
    return advantages.masked_fill(flat, 0.0).reshape(-1), spread.squeeze(1)


# ---------------------------------------------------------------- 3. the clipped objective with the KL penalty

def sequence_losses(log_probs, old_log_probs, ref_log_probs, advantages, mask, clip, kl_beta):
    """Each answer's loss, the mean over its tokens of
    -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + beta * KL, and its mean KL, both (N,).

    log_probs, old_log_probs, ref_log_probs: (N, S) per-token log-probabilities of the sampled
    tokens under the policy, the sampling policy and the reference; advantages (N,); mask (N, S)
    marks the answer's tokens."""
    ratio = torch.exp(log_probs - old_log_probs)
    advantages = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    ref_minus_policy = ref_log_probs - log_probs
    kl = torch.exp(ref_minus_policy) - ref_minus_policy - 1
    mask = mask.to(log_probs.dtype)
    tokens = mask.sum(dim=1).clamp(min=1)
    losses = ((-surrogate + kl_beta * kl) * mask).sum(dim=1) / tokens
    return losses, (kl.detach() * mask).sum(dim=1) / tokens


def answer_batch(prompts, answers, group_size, device):
    """Prompt + answer token sequences, right-padded, labelled on the answer tokens only."""
    items = []
    for row, answer in enumerate(answers):
        prompt = prompts[row // group_size]
        items.append({"input_ids": torch.tensor(prompt + answer, dtype=torch.long),
                      "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + answer, dtype=torch.long)})
    batch = collate(items)
    return batch["input_ids"].to(device), batch["labels"].to(device)


# ---------------------------------------------------------------- the stage's loss

def grpo_loss(model, batch, normalizer, helpers):
    """batch: collate() of PromptDataset items (prompts right-padded, their records alongside).

    Training samples grpo_group_size answers a prompt at grpo_temperature; validation (eval mode)
    answers each prompt once, greedily, so val_reward is the held-out score of greedy answers.
    The loss and every metric are sums over prompts divided by `normalizer` (prompts in the whole
    optimizer step), so micro-batches add up to the mean over the step's prompts."""
    settings, sampling = helpers.settings, model.training
    group_size = settings.grpo_group_size if sampling else 1
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    records = list(batch["records"])
    temperature = settings.grpo_temperature if sampling else 0.0
    replaced = prioritized = 0
    if sampling:
        indices = helpers.place[batch["indices"]].tolist()  # the prompts' places in train_set
        if settings.grpo_prioritize:
            prioritized = prioritize(helpers, prompts, records, indices)
    groups = Groups(model, helpers, prompts, records, group_size, temperature)
    if sampling:
        replaced = resample_flat_groups(model, helpers, prompts, records, indices, groups, temperature)
        helpers.flat[indices] = all_equal(groups.rewards.view(-1, group_size))
    answers, rewards, lengths = groups.answers, groups.rewards, groups.lengths
    advantages, spread = group_advantages(rewards, group_size)

    device = model_device(model)
    input_ids, labels = answer_batch(prompts, answers, group_size, device)
    log_probs = response_log_probs(model, input_ids, labels, per_token=True)
    ref_log_probs = reference_log_probs(model, helpers.reference, input_ids, labels, per_token=True)
    mask = (next_token_targets(labels) != IGNORE_INDEX).view_as(labels)
    losses, kl = sequence_losses(log_probs, log_probs.detach(), ref_log_probs, advantages.to(device), mask,
                                 settings.grpo_clip, settings.grpo_kl_beta)

    def per_prompt(values):  # mean over each group, summed over the prompts, / normalizer
        return values.view(-1, group_size).mean(dim=1).sum() / normalizer
    loss = per_prompt(losses)
    metrics = {"loss": loss.detach(), "reward": per_prompt(rewards), "kl": per_prompt(kl),
               "answer_length": per_prompt(lengths)}
    if sampling:
        metrics["reward_std"] = spread.sum() / normalizer
        metrics["no_signal"] = (spread == 0).float().sum() / normalizer
        if settings.grpo_resample:
            metrics["resampled"] = torch.tensor(replaced / normalizer)
        if settings.grpo_prioritize:
            metrics["prioritized"] = torch.tensor(prioritized / normalizer)
    if len(helpers.rewards) > 1:
        for name, values in groups.by_reward.items():
            metrics[f"reward_{name.rpartition(':')[2]}"] = per_prompt(values)
    return loss, metrics
