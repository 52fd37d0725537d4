"""Data files of a chosen size in MiniMind's exact record layouts, made from the bundled demo data,
to measure preparation and training at the sizes MiniMind's users train on.

    python bench/make_scale_data.py --kind sft --size 1GB --output /tmp/sft_1g.jsonl
    python bench/make_scale_data.py --kind pretrain --size 1GB --output /tmp/pretrain_1g.jsonl
    python bench/make_scale_data.py --kind dpo --size 50MB --output /tmp/dpo.jsonl
    python bench/make_scale_data.py --kind rlaif --size 24MB --output /tmp/rlaif.jsonl

The layouts are those of MiniMind's published files (jingyaogong/minimind, README "数据集"):

    pretrain  {"text": "..."}                                    (pretrain_t2t.jsonl)
    sft       {"conversations": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}   (sft_t2t.jsonl)
              a share of them with a system prompt, with thinking ("reasoning_content" on the assistant
              message), or with tool calls as MiniMind-3 writes them: the tools as JSON text in the system
              message's "tools", the calls as JSON text in the assistant's "tool_calls" (bare
              {"name", "arguments"} objects), the results as "tool" messages
    dpo       {"chosen": [user, assistant], "rejected": [user, assistant]}                 (dpo.jsonl)
    rlaif     {"conversations": [..., user, {"role": "assistant", "content": ""}]}          (rlaif.jsonl)

Texts are written as MiniMind writes them (ensure_ascii=False, one record a line). Sentences come
from the bundled data, combined so that records are about as long as MiniMind's (an SFT record
averages about 1 KB; a pretraining text about 0.6 KB). The same --seed and --size give the same
file. Conversations with tools or thinking need a tokenizer whose chat template renders them
(MiniMind-3's: --tokenizer tests/fixtures/minimind3_tokenizer); --plain leaves them out.
"""
import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"

# As MiniMind's lm_dataset.py adds them to a share of its SFT conversations.
SYSTEM_PROMPTS = [
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。", "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。", "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
]

TOOLS = [
    {"type": "function", "function": {"name": "calculate_math", "description": "计算数学表达式",
                                      "parameters": {"type": "object", "properties": {"expression": {
                                          "type": "string", "description": "数学表达式"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "get_current_time", "description": "获取当前时间",
                                      "parameters": {"type": "object", "properties": {"timezone": {
                                          "type": "string", "description": "时区"}}, "required": []}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "translate_text", "description": "翻译文本",
                                      "parameters": {"type": "object", "properties": {
                                          "text": {"type": "string"}, "target_language": {"type": "string"}},
                                          "required": ["text", "target_language"]}}},
]

SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(text):
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 1GB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def read_jsonl(name):
    with open(DATA / name, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


class Material:
    """The bundled data's sentences, questions and answers, to draw from."""

    def __init__(self):
        # prose only: the demo corpus also holds conversations in the chat template, whose special
        # tokens do not belong inside a scaled answer or text
        self.texts = [record["text"] for record in read_jsonl("pretrain.jsonl")
                      if not record["text"].startswith("<|im_start|>")]
        self.turns = []   # (question, answer) pairs of the SFT data
        for record in read_jsonl("sft_train.jsonl"):
            messages = record["conversations"]
            self.turns += [(q["content"], a["content"]) for q, a in zip(messages[0::2], messages[1::2])]
        self.pairs = [(record["chosen"][0]["content"], record["chosen"][1]["content"], record["rejected"][1]["content"])
                      for record in read_jsonl("dpo_train.jsonl")]

    def passage(self, rng, low, high):
        return "".join(rng.choice(self.texts) for _ in range(rng.randint(low, high)))


def pretrain_record(rng, material):
    return {"text": material.passage(rng, 2, 12)}


def sft_record(rng, material, plain=False):
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    kind = "plain" if plain else rng.choices(["plain", "thinking", "tools"], weights=[80, 10, 10])[0]
    if kind == "tools":
        return tool_record(rng, material)
    for _ in range(rng.choices([1, 2, 3], weights=[60, 30, 10])[0]):
        question, answer = rng.choice(material.turns)
        answer = answer + material.passage(rng, 1, 6)  # MiniMind's answers are longer than the demo's
        message = {"role": "assistant", "content": answer}
        if kind == "thinking":
            message = {"role": "assistant", "reasoning_content": material.passage(rng, 1, 3), "content": answer}
        messages += [{"role": "user", "content": question}, message]
    return {"conversations": messages}


def tool_record(rng, material):
    tool = rng.choice(TOOLS)
    name = tool["function"]["name"]
    arguments = {"calculate_math": {"expression": f"{rng.randint(2, 999)} * {rng.randint(2, 99)}"},
                 "get_current_time": {"timezone": "Asia/Shanghai"},
                 "get_weather": {"city": rng.choice(["Paris", "北京", "上海", "Morka"])},
                 "translate_text": {"text": "你好世界", "target_language": "english"}}[name]
    question, _ = rng.choice(material.turns)
    return {"conversations": [
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS), "tools": json.dumps(TOOLS, ensure_ascii=False)},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "",
         "tool_calls": json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)},
        {"role": "tool", "content": json.dumps({"result": material.passage(rng, 1, 1)}, ensure_ascii=False)},
        {"role": "assistant", "content": material.passage(rng, 1, 4)}]}


def dpo_record(rng, material):
    question, chosen, rejected = rng.choice(material.pairs)
    extra = material.passage(rng, 0, 3)
    return {"chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": chosen + extra}],
            "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": rejected + extra}]}


def rlaif_record(rng, material):
    """MiniMind's RL prompt sets: SFT conversations whose last assistant turn is left empty."""
    messages = sft_record(rng, material, plain=True)["conversations"]
    messages[-1] = {"role": "assistant", "content": ""}
    return {"conversations": messages}


KINDS = {"pretrain": pretrain_record, "sft": sft_record, "dpo": dpo_record, "rlaif": rlaif_record}


def write(kind, size, output, seed=0, plain=False):
    """Records of `kind` until the file holds at least `size` bytes; returns (records, bytes)."""
    rng, material = random.Random(seed), Material()
    make = KINDS[kind]
    arguments = {"plain": plain} if kind == "sft" else {}
    written = records = 0
    output = Path(output)
    temporary = output.with_name(output.name + ".partial")
    start = time.perf_counter()
    with open(temporary, "wb") as file:
        while written < size:
            lines = [json.dumps(make(rng, material, **arguments), ensure_ascii=False) + "\n" for _ in range(100)]
            data = "".join(lines).encode("utf-8")
            file.write(data)
            written += len(data)
            records += len(lines)
            if sys.stderr.isatty():
                print(f"\r{written / 1e6:,.0f} / {size / 1e6:,.0f} MB", end="", file=sys.stderr, flush=True)
    temporary.replace(output)
    print(f"\r{output}: {records:,} {kind} records, {written / 1e6:,.1f} MB in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return records, written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--size", type=parse_size, required=True, help="e.g. 100MB, 1GB (the file ends after the "
                                                                      "100-record block that reaches it)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="SFT without tool calls and thinking (for tokenizers "
                                                             "whose template cannot render them)")
    args = parser.parse_args(argv)
    write(args.kind, args.size, args.output, args.seed, args.plain)


if __name__ == "__main__":
    main()
