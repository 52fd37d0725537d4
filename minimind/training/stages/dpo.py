"""DPO, Direct Preference Optimization: learn from pairs (prompt, chosen answer, rejected answer),
against a frozen reference (the starting weights; under LoRA the adapters switched off):

    loss = -log sigmoid(beta * [(log pi(chosen) - log pi_ref(chosen)) - (log pi(rejected) - log pi_ref(rejected))])

with log pi(answer) a response's summed log-probability. The loss, the reference and the
log-probabilities are in training/dpo.py (GRPO shares the reference).

Records: preference pairs (data/records.py PAIRS), labelled on the response tokens. A batch holds the
chosen rows, then as many rejected rows, so that one forward pass scores both halves. No dropout by
default: DPO compares log-probabilities of two answers, which dropout noise would blur. The sample at
the end of a run answers the prompt of a validation pair.
"""
import difflib
from dataclasses import dataclass

from ...data.records import PAIRS
from ...settings import setting
from .stage import Stage


@dataclass
class DPOSettings:
    dpo_beta: float = setting(0.1, "DPO temperature beta", low=0, high=1000, low_open=True)


def pair_rows(items):
    """Collation: the chosen rows, then the rejected rows in the same order."""
    chosen = [{"input_ids": item["chosen_input_ids"], "labels": item["chosen_labels"]} for item in items]
    rejected = [{"input_ids": item["rejected_input_ids"], "labels": item["rejected_labels"]} for item in items]
    return chosen + rejected, {}


def count_pairs(batch):
    return batch["input_ids"].shape[0] // 2  # chosen rows, then as many rejected rows


def loss(model, batch, normalizer, helpers):
    from ..dpo import dpo_batch_loss  # torch-side: `train --help` reads this module without loading torch
    return dpo_batch_loss(model, batch, helpers["beta"], helpers["reference"], normalizer)


def make_helpers(model, config, train_set):
    from ..dpo import make_reference  # torch-side: `train --help` reads this module without loading torch
    return {"reference": make_reference(model), "beta": config.dpo.dpo_beta}


# ---------------------------------------------------------------- `minimind eval` on preference pairs

def similarity(a, b):
    """Character-level similarity in [0, 1]: 2 * matched characters / total characters (difflib)."""
    return difflib.SequenceMatcher(None, a.strip(), b.strip(), autojunk=False).ratio()


def evaluate(evaluator, path):
    """The share of pairs whose chosen response has the higher summed log-probability under the model
    (no reference model: this is the model's own preference, not DPO's reward accuracy), and the
    model's greedy answer to each prompt compared with both responses: exact matches, and character
    similarity (difflib's ratio), counting the pairs where the answer is closer to the chosen
    response and those where it is closer to the rejected one."""
    pairs = evaluator.records(path)
    prompts = [pair["prompt_messages"] for pair in pairs]
    chosen_log_probs = evaluator.response_log_probs(prompts, [pair["chosen"] for pair in pairs])
    rejected_log_probs = evaluator.response_log_probs(prompts, [pair["rejected"] for pair in pairs])

    # Which answer the model's own greedy answer resembles.
    chosen_texts = [pair["chosen"][0]["content"] for pair in pairs]
    rejected_texts = [pair["rejected"][0]["content"] for pair in pairs]
    answers = evaluator.greedy_answers(prompts, [max(c, r, key=len) for c, r in zip(chosen_texts, rejected_texts)])
    records = []
    for index, answer in enumerate(answers):
        records.append({"pair": index, "question": pairs[index]["prompt_messages"][-1]["content"],
                        "chosen": chosen_texts[index], "rejected": rejected_texts[index], "answer": answer,
                        "log_prob_chosen": chosen_log_probs[index], "log_prob_rejected": rejected_log_probs[index],
                        "similarity_chosen": similarity(answer, chosen_texts[index]),
                        "similarity_rejected": similarity(answer, rejected_texts[index])})
    n = len(records)

    def share(condition):
        return sum(1 for record in records if condition(record)) / n if n else float("nan")

    def mean(key):
        return sum(record[key] for record in records) / n if n else float("nan")
    return {"pairs": n,
            "preference_accuracy": share(lambda r: r["log_prob_chosen"] > r["log_prob_rejected"]),
            "log_prob_margin": mean("log_prob_chosen") - mean("log_prob_rejected"),
            "greedy_closer_to_chosen": share(lambda r: r["similarity_chosen"] > r["similarity_rejected"]),
            "greedy_closer_to_rejected": share(lambda r: r["similarity_rejected"] > r["similarity_chosen"]),
            "greedy_equals_chosen": share(lambda r: r["answer"].strip() == r["chosen"].strip()),
            "greedy_equals_rejected": share(lambda r: r["answer"].strip() == r["rejected"].strip()),
            "similarity_chosen": mean("similarity_chosen"), "similarity_rejected": mean("similarity_rejected"),
            "details": records}


def report_rows(report):
    return [("prefers chosen", f"{report['preference_accuracy']:.1%} (log-probability, {report['pairs']} pairs)"),
            ("log-prob margin", f"{report['log_prob_margin']:.3f}"),
            ("greedy closer to", f"chosen {report['greedy_closer_to_chosen']:.1%}, "
                                 f"rejected {report['greedy_closer_to_rejected']:.1%}"),
            ("greedy equals", f"chosen {report['greedy_equals_chosen']:.1%}, "
                              f"rejected {report['greedy_equals_rejected']:.1%}"),
            ("mean similarity", f"chosen {report['similarity_chosen']:.3f}, "
                                f"rejected {report['similarity_rejected']:.3f}")]


STAGE = Stage("dpo", "DPO", reads=(PAIRS,), loss=loss, count=count_pairs, rows=pair_rows, make_helpers=make_helpers,
              settings=DPOSettings, settings_title="fine-tuning: DPO", default_dropout=0.0,
              evaluate=evaluate, report_rows=report_rows)
