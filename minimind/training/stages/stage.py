"""What a training stage is: the entry its module makes for the stage table (stages/__init__.py).

An entry says what the stage reads (record formats, data/records.py), how its items become a batch
(`rows`), what it minimises and over how many items (`loss`, `count`), what it needs beside the model
(`make_helpers`: a frozen reference, a teacher, rewards), its own flags and which of them a --resume
must keep, what `minimind eval` measures on its records, and the prompt of the sample printed at the
end of a run. The loop, the optimizer, mixed precision, checkpoints and logs are the trainer's, the
same for every stage.

`train --help` reads the table (the --stage choices, each stage's flags) and must not load torch
(tests/test_cli.py): a stage module imports torch-side code only inside the functions that compute,
which run once a run has started.

A loss is a sum over the stage's items (labelled tokens, preference pairs, prompts) divided by a
`normalizer`, the number of items in the whole optimizer step: the micro-batches of one step then
add up to the mean over all of them, each item weighing the same, as one large batch would.
"""
from dataclasses import dataclass
from typing import Callable

from ...model.labels import IGNORE_INDEX

SAMPLE_PROMPT_TOKENS = 16  # a text's sample continues its first tokens


# ---------------------------------------------------------------- the language-model pieces (pretrain, SFT, distill)

def language_model_loss(model, batch, normalizer, helpers=None):
    """Next-token cross-entropy over the labelled tokens (all of them in pretraining, the assistant's
    in SFT), from the model's own forward, plus the MoE load-balancing loss.

    Batches are right-padded and attention is causal, so no real token ever sees a pad: the plain
    causal path (no mask) gives the same result, faster. Pads carry label IGNORE_INDEX."""
    out = model(batch["input_ids"], labels=batch["labels"], num_items_in_batch=normalizer, return_logits=False)
    share = count_labelled_tokens(batch) / normalizer  # this micro-batch's part of the step
    return out.loss + out.aux_loss * share, {"loss": out.loss.detach()}


def count_labelled_tokens(batch):
    """Tokens that have a next-token target: labels[:, 1:] that are not IGNORE_INDEX."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def one_row_per_item(items):
    """The plain collation: each item ({"input_ids", "labels"}) is one row of the batch, nothing else."""
    return items, {}


def no_helpers(model, config, train_set):
    return None


def with_skills(report):
    """The report with its exact match per "skill" label of its details (in the order skills first
    appear; the bundled held-out questions carry one), as by_skill; unchanged when none has one."""
    groups = {}
    for detail in report["details"]:
        if "skill" in detail:
            group = groups.setdefault(detail["skill"], {"correct": 0, "total": 0})
            group["correct"] += detail["match"]
            group["total"] += 1
    for group in groups.values():
        group["exact_match"] = group["correct"] / group["total"]
    return {**report, "by_skill": groups} if groups else report


def skill_rows(report):
    """One table row per skill of the report's by_skill."""
    return [(f"  {skill}", f"{group['exact_match']:.1%} ({group['correct']}/{group['total']})")
            for skill, group in (report.get("by_skill") or {}).items()]


def prompt_before_answer(row):
    """The sample's prompt, from the first row of a validation item: the tokens before its first
    labelled one (a conversation's prompt; all of a GRPO prompt), or, when every token is labelled
    (a text), its first SAMPLE_PROMPT_TOKENS."""
    ids, labelled = row["input_ids"], row["labels"] != IGNORE_INDEX
    if bool(labelled.all()):
        return ids[:SAMPLE_PROMPT_TOKENS].tolist()
    answer_start = int(labelled.nonzero()[0]) if bool(labelled.any()) else len(ids)
    return ids[:answer_start].tolist()


# ---------------------------------------------------------------- the entry

@dataclass(frozen=True)
class Stage:
    name: str                 # --stage NAME
    title: str                # how the help names it: "pretraining", "SFT", "DPO" ...
    reads: tuple              # the record formats it trains on (data/records.py FORMATS)
    loss: Callable            # (model, batch, normalizer, helpers) -> (loss, {metric: tensor})
    count: Callable = count_labelled_tokens   # batch -> how many items its loss averages over
    rows: Callable = one_row_per_item         # its collation: items -> (rows to pad, other batch fields)
    make_helpers: Callable = no_helpers       # (model, TrainConfig, training set) -> what the loss needs beside the model;
                                              # helpers with state_dict()/load_state_dict() are checkpointed
    settings: type = None          # its own flags: a dataclass of settings.setting fields, config.<name>
    settings_title: str = None     # their group in --help
    resume_flags: tuple = ()       # its flags that a --resume must not change
    check: Callable = None         # (TrainConfig, chosen: bool) -> UserError for flags that do not fit
    input_paths: Callable = None   # TrainConfig -> [(flag, path)]: files its flags name, which must exist
    default_dropout: float = 0.1   # the --dropout a run of this stage gets when the flag is not given
    perplexity: bool = False       # validation reports the loss and its perplexity (else every metric)
    headline: str = "loss"         # the validation metric the end of a run compares with its start
    evaluate: Callable = None      # (Evaluator, path) -> report: `minimind eval` on a file of its records
    report_rows: Callable = None   # report -> [(name, value)]: the table `minimind eval` prints
    sample_prompt: Callable = prompt_before_answer  # a validation item's first row -> the sample's prompt ids
