"""ORPO, odds-ratio preference optimisation (Hong et al. 2024): supervised fine-tuning on the chosen
answer and, in the same loss, a push of its odds above the rejected answer's. One stage instead of
SFT then DPO, and no reference model.

For a response y to a prompt x, with P(y | x) the geometric mean of its tokens' probabilities (the
exponential of its mean log-probability per token) and odds(y) = P(y | x) / (1 - P(y | x)):

    loss = NLL(chosen) + lambda * -log sigmoid(log odds(chosen) - log odds(rejected))

NLL(chosen) is the SFT loss on the chosen answer, its mean next-token cross-entropy (-log P). The
second term is small once the chosen answer's odds are well above the rejected one's; lambda
(--orpo_lambda) weighs it. Both are per pair, summed over the step's pairs and divided by their
number (`normalizer`), so every pair weighs the same.

It reads DPO's preference pairs and batches them as DPO does (stages/dpo.py: chosen rows, then
rejected rows, one forward pass); `minimind eval` on pairs measures preferences as for DPO. Its
validation reports the loss, its two parts, the mean log odds ratio and the share of pairs whose
chosen answer has the higher odds (accuracy).
"""
from dataclasses import dataclass

from ...data.records import PAIRS
from ...model.labels import IGNORE_INDEX
from ...settings import setting
from .dpo import count_pairs, evaluate, pair_rows, report_rows
from .stage import Stage

# A mean log-probability of exactly 0 (a response the model is certain of) has infinite odds; just
# below it the odds are large and finite, and the gradient stays a number.
MAX_MEAN_LOG_PROB = -1e-7


@dataclass
class ORPOSettings:
    orpo_lambda: float = setting(0.1, "ORPO weight lambda of the odds-ratio term: loss = NLL(chosen) + lambda * "
                                      "-log sigmoid(log odds(chosen) - log odds(rejected))", low=0, high=1000)


def log_odds(mean_log_prob):
    """log(P / (1 - P)) from log P: log P - log(-expm1(log P)), exact for P near 0 and near 1."""
    mean_log_prob = mean_log_prob.clamp(max=MAX_MEAN_LOG_PROB)
    return mean_log_prob - (-mean_log_prob.expm1()).log()


def odds_ratio_loss(chosen_nll, rejected_nll, chosen_tokens, rejected_tokens, weight, normalizer):
    """The ORPO loss and its diagnostics from each response's summed negative log-likelihood and its
    number of tokens (all (B,)): sum over the pairs of NLL(chosen) / tokens + weight * -log sigmoid(
    log odds ratio), divided by `normalizer`."""
    import torch.nn.functional as F  # torch-side: `train --help` reads this module without loading torch
    sft = chosen_nll / chosen_tokens                     # -log P(chosen): the SFT loss on the chosen answer
    log_odds_ratio = log_odds(-sft) - log_odds(-rejected_nll / rejected_tokens)
    odds_ratio = -F.logsigmoid(log_odds_ratio)
    loss = (sft + weight * odds_ratio).sum() / normalizer
    # a tie (equal odds) counts as a coin flip, as DPO's accuracy does
    accuracy = ((log_odds_ratio > 0).float() + 0.5 * (log_odds_ratio == 0).float()).sum() / normalizer
    metrics = {"loss": loss.detach(), "sft": sft.sum().detach() / normalizer,
               "odds_ratio": odds_ratio.sum().detach() / normalizer,
               "log_odds_ratio": log_odds_ratio.sum().detach() / normalizer, "accuracy": accuracy.detach()}
    return loss, metrics


def loss(model, batch, normalizer, helpers):
    """batch: DPO's collation, the chosen rows then the rejected rows. The responses' summed
    log-likelihoods come from the model's forward (loss_reduction="sequence"), the same
    cross-entropy as SFT's; the MoE balancing loss is added for this micro-batch's share of pairs."""
    out = model(batch["input_ids"], labels=batch["labels"], loss_reduction="sequence", return_logits=False)
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    half = len(tokens) // 2
    total, metrics = odds_ratio_loss(out.loss[:half], out.loss[half:], tokens[:half], tokens[half:],
                                     helpers["orpo_lambda"], normalizer)
    return total + out.aux_loss * (half / normalizer), metrics


def make_helpers(model, config, train_set):
    return {"orpo_lambda": config.orpo.orpo_lambda}  # all the loss needs beside the model


STAGE = Stage("orpo", "ORPO", reads=(PAIRS,), loss=loss, count=count_pairs, rows=pair_rows, make_helpers=make_helpers,
              settings=ORPOSettings, settings_title="fine-tuning: ORPO", resume_flags=("orpo_lambda",),
              # like DPO, it compares the two answers' likelihoods, which dropout noise would blur
              default_dropout=0.0, evaluate=evaluate, report_rows=report_rows)
