"""Rewards for GRPO: plain Python functions that score an answer, combined with weights.

    --reward exact_match                         (the default)
    --reward exact_match=1 answer_pattern=0.2
    --reward my_rewards:brevity=0.5              a function of yours: module:function or file.py:function
    --reward path/to/reward_model                a reward model: a local Hugging Face sequence-classification
                                                 model, as TRL's GRPO trainer takes one

A reward function takes the prompt (the text of its last user message), the model's answer (its
text, without the closing <|im_end|>) and the record (a dict of its fields as written in the data
file, so record["answer"] is the reference answer), and returns a number:

    def brevity(prompt, answer, record):
        return 1.0 if len(answer) <= 2 * len(record["answer"]) else 0.0

An answer's reward is the weighted sum r = sum_k w_k * R_k(prompt, answer, record). Built in:

    exact_match     1 when the answer equals record["answer"] (surrounding whitespace ignored),
                    the comparison `minimind eval` reports as exact match; else 0
    answer_pattern  1 when the whole answer (stripped) matches the regular expression
                    record["pattern"], a required answer format; else 0
    numbers         partial credit for numeric answers: the share of the reference's numbers that
                    the answer writes at the same places (`Subtracting 2 from 7 leaves 4.` against
                    `Subtracting 2 from 7 leaves 5.` scores 2/3, an extra or missing number counts
                    as a miss); for a reference without numbers, exact_match

Prompts without a reference answer (MiniMind's RL prompt sets, whose last assistant turn is empty)
need rewards that judge an answer on its own: a function of yours, or a reward model. A reward model
scores the whole conversation, prompt messages and answer, rendered by its own tokenizer's chat
template: its first output for the last token is the reward (TRL's GRPOTrainer does the same).
"""
import importlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..errors import UserError

# ---------------------------------------------------------------- the built-in rewards

def is_exact_match(answer, reference):
    """The answer is the reference, surrounding whitespace aside."""
    return answer.strip() == reference.strip()


NO_REFERENCE = ("has no reference answer (\"answer\"): MiniMind's RL prompt sets leave the last assistant turn "
                "empty; score such prompts with a reward model (--reward PATH_TO_MODEL) or a function of yours "
                "(--reward module:function)")


def exact_match(prompt, answer, record):
    if record.get("answer") is None:
        raise UserError(f"the exact_match reward compares answers with the reference answer, but the prompt "
                        f"{prompt!r} {NO_REFERENCE}")
    return 1.0 if is_exact_match(answer, record["answer"]) else 0.0


@lru_cache(maxsize=1024)
def compiled_pattern(pattern):
    try:
        return re.compile(pattern)
    except re.error as error:
        raise UserError(f"answer_pattern: the record's \"pattern\" {pattern!r} is not a regular expression "
                        f"({error})") from None


def answer_pattern(prompt, answer, record):
    pattern = record.get("pattern")
    if not isinstance(pattern, str):
        raise UserError(f'the answer_pattern reward needs a "pattern" field (a regular expression) in every '
                        f'record; the one for the prompt {prompt!r} has {"none" if pattern is None else pattern!r}')
    return 1.0 if compiled_pattern(pattern).fullmatch(answer.strip()) else 0.0


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def numbers(prompt, answer, record):
    """The share of the reference's numbers the answer writes, place by place: an answer that copies
    a question's operands right and gets the result wrong earns part of the reward, so a group whose
    answers are all wrong still ranks the ones that copied more (docs/training_guide.md, "The CPU
    session")."""
    expected = NUMBER.findall(record.get("answer") or "")
    if not expected:   # a reference without numbers scores as exact_match (and none at all gets its error)
        return exact_match(prompt, answer, record)
    written = NUMBER.findall(answer)
    return sum(a == b for a, b in zip(written, expected)) / max(len(expected), len(written))


BUILT_IN = {"exact_match": exact_match, "answer_pattern": answer_pattern, "numbers": numbers}


# ---------------------------------------------------------------- --reward NAME[=WEIGHT]

@dataclass
class Reward:
    name: str            # as given: a built-in name, module:function or a reward model's folder
    function: Callable   # (prompt, answer, record) -> number; or a RewardModel
    weight: float

    def scores(self, records, answers):
        """The reward of each answer to its record's prompt, each a finite number."""
        prompts = [record["prompt_messages"][-1]["content"] for record in records]
        if isinstance(self.function, RewardModel):
            values = self.function.score(records, answers)
        else:
            values = [self.function(prompt, answer, record["fields"])
                      for prompt, answer, record in zip(prompts, answers, records)]
        return [finite(self.name, value, prompt) for value, prompt in zip(values, prompts)]


def finite(name, returned, prompt):
    try:
        value = float(returned)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"--reward {name} returned {returned!r} for the prompt {prompt!r}; a reward must "
                        f"be a finite number")
    return value


class RewardModel:
    """A local Hugging Face sequence-classification model (one output) as a reward: it reads the
    prompt's messages and the answer as an assistant turn, rendered by its own tokenizer's chat
    template, and its output at the last token is the reward, as TRL's GRPOTrainer scores with one.
    It needs no reference answer."""

    BATCH = 16

    def __init__(self, path, device=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # only when a run asks for one
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
        except Exception as error:  # transformers raises many kinds; all mean the same to the user
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"--reward {path}: cannot load a sequence-classification reward model there "
                            f"({first_line})") from None
        if not self.tokenizer.chat_template:
            raise UserError(f"--reward {path}: the reward model's tokenizer has no chat template to render the "
                            f"prompt and the answer with")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # it finds each row's last real token by it
        self.model.eval().to(device or "cpu")

    def texts(self, records, answers):
        return [self.tokenizer.apply_chat_template(
                    record["prompt_messages"] + [{"role": "assistant", "content": answer}],
                    tools=record.get("tools") or None, tokenize=False)
                for record, answer in zip(records, answers)]

    def score(self, records, answers):
        import torch  # here, not at the top: train.py checks --reward before it loads torch
        texts, values = self.texts(records, answers), []
        with torch.no_grad():
            for first in range(0, len(texts), self.BATCH):
                inputs = self.tokenizer(texts[first:first + self.BATCH], return_tensors="pt", padding=True,
                                        padding_side="right", add_special_tokens=False).to(self.model.device)
                values += self.model(**inputs).logits[:, 0].float().tolist()
        return values


def parse_reward_spec(spec):
    """'NAME[=WEIGHT]' -> (name, weight); a bad weight is an error naming the flag."""
    name, separator, weight_text = spec.rpartition("=")
    if not separator:
        name, weight_text = spec, "1"
    try:
        weight = float(weight_text)
    except ValueError:
        raise UserError(f"--reward {spec}: the weight after '=' must be a number, got {weight_text!r}") from None
    if not name or not math.isfinite(weight):
        raise UserError(f"--reward {spec}: expected NAME or NAME=WEIGHT with a finite weight, e.g. exact_match=1")
    return name, weight


def import_function(name):
    """module:function (the module importable from the current directory too) or path/to/file.py:function."""
    module_name, _, function_name = name.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UserError(f"--reward {name}: file {path} not found")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: your reward module beside your data
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UserError(f"--reward {name}: cannot import {module_name} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--reward {name}: {module_name} has no function {function_name}")
    return function


def check_signature(name, function):
    try:
        inspect.signature(function).bind(None, None, None)
    except TypeError:
        raise UserError(f"--reward {name}: the function must take (prompt, answer, record) and return a number") from None
    except ValueError:
        pass  # a builtin without a signature: trust it


def load_rewards(specs, device=None):
    """The --reward list -> [Reward], each function found and its signature checked, each reward model
    loaded (onto `device`)."""
    rewards = []
    for spec in specs:
        name, weight = parse_reward_spec(spec)
        if name in BUILT_IN:
            function = BUILT_IN[name]
        elif Path(name).is_dir():
            rewards.append(Reward(name, RewardModel(name, device), weight))
            continue
        elif ":" in name:
            function = import_function(name)
        else:
            raise UserError(f"--reward {spec}: {name} is neither a built-in reward ({', '.join(BUILT_IN)}), "
                            f"module:function, nor a reward model's folder")
        check_signature(name, function)
        rewards.append(Reward(name, function, weight))
    return rewards


# ---------------------------------------------------------------- scoring answers

def score_answers(rewards, records, answers):
    """Each answer's total reward sum_k w_k R_k, (N,), and each reward's own values {name: (N,)}.

    records[i] (normalized GRPO records, data/records.py) is the prompt answers[i] responds to."""
    import torch  # here, not at the top: train.py checks --reward before it loads torch
    values = {reward.name: torch.tensor(reward.scores(records, answers), dtype=torch.float32) for reward in rewards}
    total = sum(reward.weight * values[reward.name] for reward in rewards)
    return total, values
