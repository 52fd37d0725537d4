"""The training stages, as data: one table saying, for each stage, what it reads, what it minimises,
what it needs beside the model, and how its losses add up over micro-batches.

    stage     records it reads          loss                                    also needs
    pretrain  {"text"}                  next-token cross-entropy, every token   -
    sft       {"conversations"}         next-token cross-entropy, answers only  -
    dpo       {"chosen", "rejected"}    sigmoid DPO loss on response log-probs  a frozen reference
    grpo      {"prompt", "answer"}, or  clipped policy gradient on sampled      a frozen reference, rewards,
              conversations ending in   answers + KL to the reference           a sampling generator
              an empty assistant turn
    distill   {"text"} or conversations cross-entropy + KL to the teacher's     a frozen teacher
                                        next-token distribution

Which parameters train is not a property of the stage: all of them, or only LoRA adapters with
--lora_rank (any stage). Adding a stage is one entry here and its loss function.

A loss is a sum over the stage's items (labelled tokens, preference pairs) divided by a
`normalizer`, the number of items in the whole optimizer step: the micro-batches of one step
then add up to the mean over all of them, each item weighing the same, as one large batch would.
"""
from dataclasses import dataclass
from typing import Callable

from ..data.datasets import DPODataset, PretrainDataset, PromptDataset, SFTDataset
from ..data.records import detect_stage
from . import distill, grpo
from .dpo import dpo_batch_loss, make_reference


@dataclass(frozen=True)
class Stage:
    name: str
    records: tuple          # the record formats it reads (data/records.py): "pretrain", "sft", "dpo", "grpo"
    make_dataset: Callable  # (paths, tokenizer, DataSettings) -> Dataset
    loss: Callable          # (model, batch, normalizer, helpers) -> (loss, {metric: tensor})
    count: Callable         # batch -> how many items its loss averages over
    make_helpers: Callable  # (model, TrainConfig) -> what the loss needs beside the model (or None);
                            # helpers with state_dict()/load_state_dict() are saved in checkpoints
    default_dropout: float  # the --dropout a run of this stage gets when the flag is not given
    perplexity: bool = False  # validation reports the loss and its perplexity (else every metric)
    headline: str = "loss"    # the validation metric the end of a run compares with its start


def language_model_loss(model, batch, normalizer, helpers=None):
    """Next-token cross-entropy over the labelled tokens (all of them in pretraining, the assistant's
    in SFT), from the model's own forward, plus the MoE load-balancing loss.

    Batches are right-padded and attention is causal, so no real token ever sees a pad: the plain
    causal path (no mask) gives the same result, faster. Pads carry label -100."""
    out = model(batch["input_ids"], labels=batch["labels"], num_items_in_batch=normalizer, return_logits=False)
    share = count_labelled_tokens(batch) / normalizer  # this micro-batch's part of the step
    return out.loss + out.aux_loss * share, {"loss": out.loss.detach()}


def count_labelled_tokens(batch):
    """Tokens that have a next-token target: labels[:, 1:] that are not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def count_pairs(batch):
    return batch["input_ids"].shape[0] // 2  # chosen rows, then as many rejected rows


def preference_loss(model, batch, normalizer, helpers):
    return dpo_batch_loss(model, batch, helpers["beta"], helpers["reference"], normalizer)


def preference_helpers(model, config):
    return {"reference": make_reference(model), "beta": config.dpo.dpo_beta}


def pretrain_dataset(paths, tokenizer, settings):
    return PretrainDataset(paths, tokenizer, settings.max_seq_len, skip_bad_records=settings.skip_bad_records,
                           workers=settings.prepare_workers)


def sft_dataset(paths, tokenizer, settings):
    return SFTDataset(paths, tokenizer, settings.max_seq_len, settings.skip_bad_records, workers=settings.prepare_workers)


def dpo_dataset(paths, tokenizer, settings):
    return DPODataset(paths, tokenizer, settings.max_seq_len, settings.skip_bad_records, workers=settings.prepare_workers)


def prompt_dataset(paths, tokenizer, settings):
    return PromptDataset(paths, tokenizer, settings.max_seq_len, settings.skip_bad_records,
                         workers=settings.prepare_workers)


def text_or_conversation_dataset(paths, tokenizer, settings):
    """Distillation reads pretraining text or SFT conversations, whichever the files hold."""
    maker = pretrain_dataset if detect_stage(paths) == "pretrain" else sft_dataset
    return maker(paths, tokenizer, settings)


def no_helpers(model, config):
    return None


STAGES = {
    "pretrain": Stage("pretrain", ("pretrain",), pretrain_dataset, language_model_loss, count_labelled_tokens,
                      no_helpers, default_dropout=0.1, perplexity=True),
    "sft": Stage("sft", ("sft",), sft_dataset, language_model_loss, count_labelled_tokens, no_helpers,
                 default_dropout=0.1, perplexity=True),
    # DPO compares log-probabilities of two answers: dropout noise would blur them
    "dpo": Stage("dpo", ("dpo",), dpo_dataset, preference_loss, count_pairs, preference_helpers, default_dropout=0.0),
    # GRPO's policy ratio and KL compare the policy with the sampler and the reference token by token
    "grpo": Stage("grpo", ("grpo",), prompt_dataset, grpo.grpo_loss, grpo.count_prompts, grpo.make_helpers,
                  default_dropout=0.0, headline="reward"),
    "distill": Stage("distill", ("pretrain", "sft"), text_or_conversation_dataset, distill.distill_loss,
                     count_labelled_tokens, distill.make_helpers, default_dropout=0.1),
}
