"""GRPO, Group Relative Policy Optimization: reinforcement learning from rewards that a program checks.

Each prompt is answered --grpo_group_size times; each answer is scored by the reward functions
(training/rewards.py) and made more likely when it beats its group's average, less when it falls
below, with a KL penalty to a frozen reference. training/grpo.py has the sampling, the advantages
and the clipped loss.

Records: prompts with a reference answer (data/records.py PROMPTS), rendered up to the assistant
header; a batch carries the records along, for the rewards to read. --batch_size counts prompts.
Validation answers each prompt once, greedily, and reports the reward (the run's headline). No
dropout by default: the policy ratio and the KL compare the policy with the sampler and the reference
token by token. The sample at the end of a run answers a validation prompt.
"""
from dataclasses import dataclass

from ...data.records import PROMPTS
from ...errors import UserError
from ...settings import setting
from ..rewards import answer_pattern, is_exact_match, parse_reward_spec
from .stage import Stage, skill_rows, with_skills


FLAT_WEIGHT = 0.05  # --grpo_prioritize: a prompt whose last group had no signal, against 1 for the others


@dataclass
class GRPOSettings:
    """Reinforcement learning from rewards (grpo.py): --batch_size prompts, each answered
    --grpo_group_size times."""
    grpo_group_size: int = setting(8, "answers sampled per prompt; their rewards are compared within the group",
                                   low=2, high=4096)
    grpo_temperature: float = setting(1.0, "sampling temperature of the answers", low=0, high=100, low_open=True)
    grpo_max_new_tokens: int = setting(64, "longest answer in tokens", low=1, high=1 << 20)
    grpo_quantize: str = setting(None, "int8: sample the answers with int8 weights (the loss still uses the full "
                                       "weights); on a CPU often faster, not always: bench/grpo_rollouts.py "
                                       "measures it [none]", type=str, choices=["int8"])
    grpo_resample: int = setting(0, "dynamic sampling (DAPO): a group whose answers all got the same reward, "
                                    "which teaches nothing, is replaced by another training prompt's group, up to "
                                    "this many rounds a batch (0 = off)", low=0, high=100)
    grpo_prioritize: bool = setting(False, "a prompt whose last group's answers all got the same reward is replaced, "
                                           "before sampling, by a training prompt drawn with the others "
                                           f"{1 / FLAT_WEIGHT:.0f} times likelier than such prompts: the steps go where "
                                           "answers still differ")
    grpo_clip: float = setting(0.2, "clip range epsilon of the policy ratio: [1 - eps, 1 + eps]", low=0, high=10,
                               low_open=True)
    grpo_kl_beta: float = setting(0.04, "weight of the KL penalty to the reference model (0 = none)", low=0,
                                  high=1000)
    reward: list = setting(["exact_match"], "rewards, each NAME[=WEIGHT]: a built-in (exact_match, answer_pattern, "
                                            "numbers), module:function / file.py:function, or a reward model's folder",
                           nargs="+", type=str)


def prompt_rows(items):
    """Collation: each prompt is a row; the records travel along for the rewards, the indices for
    --grpo_prioritize."""
    return items, {"records": [item["record"] for item in items], "indices": [item["index"] for item in items]}


def count_prompts(batch):
    return batch["input_ids"].shape[0]


def loss(model, batch, normalizer, helpers):
    from ..grpo import grpo_loss  # torch-side: `train --help` reads this module without loading torch
    return grpo_loss(model, batch, normalizer, helpers)


def make_helpers(model, config, train_set):
    from ..grpo import GRPOHelpers  # torch-side: `train --help` reads this module without loading torch
    return GRPOHelpers(model, config, train_set)


def check(config, chosen):
    for spec in config.grpo.reward:
        parse_reward_spec(spec)  # the syntax now; the functions are imported when a GRPO run starts


def input_paths(config):
    """The files of rewards given as path/to/file.py:function."""
    names = [parse_reward_spec(spec)[0].rpartition(":")[0] for spec in config.grpo.reward]
    return [("--reward", name) for name in names if name.endswith(".py")]


# ---------------------------------------------------------------- `minimind eval` on GRPO prompts

def evaluate(evaluator, path):
    """Greedy answers to the prompts, scored by exact match against each record's reference answer
    (the `exact_match` reward GRPO trains with), and, when every record carries a "pattern", the
    share of answers in that format (the `answer_pattern` reward)."""
    records = evaluator.records(path)
    if any(record["answer"] is None for record in records):
        raise UserError(f"{path}: these prompts have no reference answer (MiniMind's RL prompt sets leave the last "
                        f"assistant turn empty), so there is nothing to score answers against; evaluate on prompts "
                        f"with an \"answer\"")
    answers = evaluator.greedy_answers([record["prompt_messages"] for record in records],
                                       [record["answer"] for record in records])
    with_pattern = all("pattern" in record["fields"] for record in records)
    details = []
    for record, answer in zip(records, answers):
        details.append({"question": record["prompt_messages"][-1]["content"], "reference": record["answer"],
                        "answer": answer, "match": is_exact_match(answer, record["answer"])})
        if isinstance(record["fields"].get("skill"), str):   # a label the report counts exact match by
            details[-1]["skill"] = record["fields"]["skill"]
        if with_pattern:
            details[-1]["pattern_match"] = answer_pattern(details[-1]["question"], answer, record["fields"]) == 1.0
    n = len(details)
    report = {"prompts": n, "exact_match": sum(d["match"] for d in details) / n if n else float("nan")}
    if with_pattern:
        report["pattern_match"] = sum(d["pattern_match"] for d in details) / n if n else float("nan")
    return with_skills({**report, "details": details})


def report_rows(report):
    rows = [("exact match", f"{report['exact_match']:.1%} ({sum(r['match'] for r in report['details'])}"
                            f"/{report['prompts']})")]
    if "pattern_match" in report:
        rows.append(("answer pattern", f"{report['pattern_match']:.1%}"))
    return rows + skill_rows(report)


STAGE = Stage("grpo", "GRPO", reads=(PROMPTS,), loss=loss, count=count_prompts, rows=prompt_rows,
              make_helpers=make_helpers, settings=GRPOSettings, settings_title="reinforcement learning: GRPO",
              resume_flags=("grpo_group_size", "grpo_temperature", "grpo_max_new_tokens", "grpo_resample",
                            "grpo_prioritize", "grpo_clip", "grpo_kl_beta", "reward"),
              check=check, input_paths=input_paths, default_dropout=0.0, headline="reward", evaluate=evaluate,
              report_rows=report_rows)
