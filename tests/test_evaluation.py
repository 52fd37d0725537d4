import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from minimind import load_model
from minimind.commands.main import main as cli_main
from minimind.data.tokenizer import load_tokenizer
from minimind.errors import DataError
from minimind.inference.evaluation import evaluate
from minimind.model.config import MiniMindConfig
from minimind.model.model import MiniMindForCausalLM

from .conftest import MINIMIND2_TOKENIZER, memorize

TEXTS = ["Velwen is a small town in the north of the valley.", "铜铃每周都有旅人来买。", "Add 3 and 4: 7."]
CONVERSATION = [{"role": "user", "content": "Add 3 and 4."}, {"role": "assistant", "content": "3 + 4 = 7."}]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return MiniMindForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(MINIMIND2_TOKENIZER))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def test_perplexity_is_exp_of_mean_token_loss(tokenizer, tmp_path):
    model = tiny_model()
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in TEXTS * 2])
    report = evaluate(model, tokenizer, data, max_seq_len=16)
    # Independently: the same token stream, cut into training's full windows, the model's own mean loss per
    # window, weighted by its predictions.
    stream = []
    for text in TEXTS * 2:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [0]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 15, 16):
            window = torch.tensor([stream[start:start + 16]])
            total += model(window, labels=window).loss.item() * 15
            count += 15
    assert report["tokens"] == count == len(stream) // 16 * 15 and report["windows"] == len(stream) // 16
    assert report["loss"] == pytest.approx(total / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_perplexity_equals_training_validation_on_the_same_file(tmp_path):
    """One windowing and one loss: train.py's validation on --eval_data FILE and eval on FILE agree."""
    from minimind.commands.train import main as train_main
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"{text} {n}"} for n in range(12) for text in TEXTS])
    out = tmp_path / "run"
    assert train_main(["--hidden_size", "32", "--num_layers", "1", "--num_heads", "4", "--max_seq_len", "16",
                       "--device", "cpu", "--report_to", "none", "--sample_tokens", "0", "--max_steps", "2",
                       "--data", str(data), "--eval_data", str(data), "--output_dir", str(out)]) == 0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    report = evaluate(load_model(out / "final"), load_tokenizer(out / "final"), data, max_seq_len=16)
    assert report["loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_sft_answer_loss_and_exact_match(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONVERSATION}])
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    answer_start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels = torch.full_like(ids, -100)
    labels[:, answer_start:-1] = ids[:, answer_start:-1]  # the answer and its <|im_end|>, not the final newline

    model = tiny_model()
    report = evaluate(model, tokenizer, data)
    with torch.no_grad():
        assert report["answer_loss"] == pytest.approx(model(ids, labels=labels).loss.item(), rel=1e-5)
    assert report["answers"] == 1 and report["exact_match"] == 0.0

    # A model that has memorized the conversation answers it exactly.
    memorize(model, ids, steps=120)
    report = evaluate(model.eval(), tokenizer, data)
    assert report["details"][0]["answer"] == "3 + 4 = 7."
    assert report["exact_match"] == 1.0


def saved_model_and_texts(tokenizer, tmp_path):
    """A tiny model saved as a folder `eval` can load, and a pretraining file to measure it on."""
    folder = tmp_path / "final"
    tiny_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in TEXTS])


def test_eval_command_writes_report(tokenizer, tmp_path, capsys):
    folder, data = saved_model_and_texts(tokenizer, tmp_path)
    assert cli_main(["eval", "--model", str(folder), "--data", str(data), "--max_seq_len", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    report = json.loads((folder / "eval_report.json").read_text())
    assert report["stage"] == "pretrain" and report["perplexity"] > 1

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONVERSATION}] * 3)
    assert cli_main(["eval", "--model", str(folder), "--data", str(sft), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["answers"] == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    assert cli_main(["eval", "--model", str(folder), "--data", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_max_samples_reads_only_the_first_records(tokenizer, tmp_path):
    """A sample of a large file costs its first lines: what lies beyond them is not read (here, a
    broken line that a whole-file read would stop at)."""
    lines = [json.dumps({"conversations": CONVERSATION})] * 3 + ["{broken"]
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(lines) + "\n")
    report = evaluate(tiny_model().eval(), tokenizer, data, max_samples=2)
    assert report["conversations"] == 2
    with pytest.raises(DataError, match="big.jsonl:4"):
        evaluate(tiny_model().eval(), tokenizer, data)


def test_an_interrupted_report_write_keeps_the_last_report(tokenizer, tmp_path, monkeypatch):
    folder, data = saved_model_and_texts(tokenizer, tmp_path)
    assert cli_main(["eval", "--model", str(folder), "--data", str(data), "--max_seq_len", "32"]) == 0
    before = (folder / "eval_report.json").read_bytes()
    real_write_text = Path.write_text

    def half_then_interrupted(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupted)
    assert cli_main(["eval", "--model", str(folder), "--data", str(data), "--max_seq_len", "16"]) == 130  # Ctrl-C
    monkeypatch.undo()
    assert (folder / "eval_report.json").read_bytes() == before
    assert [path.name for path in folder.iterdir() if path.name.endswith(".tmp")] == []


def test_preference_eval_scores_both_responses_and_the_greedy_answer(tokenizer, tmp_path):
    prompt = CONVERSATION[:1]
    chosen, rejected = "3 + 4 = 7.", "Well, I think it is probably 12 or so."
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Add 3 and 4.", "chosen": chosen, "rejected": rejected}])
    ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                                  add_special_tokens=False)["input_ids"]])
    model = tiny_model()
    memorize(model, ids, steps=120)  # the chosen conversation, so greedy answers it
    report = evaluate(model.eval(), tokenizer, data)
    record = report["details"][0]
    # Independently: each response's summed log-probability (its tokens and <|im_end|>) from the logits.
    prompt_len = len(tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"])
    for response, key in ((chosen, "log_prob_chosen"), (rejected, "log_prob_rejected")):
        full = prompt + [{"role": "assistant", "content": response}]
        seq = tokenizer(tokenizer.apply_chat_template(full, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        targets = range(prompt_len, len(seq) - 1)  # the answer and <|im_end|>, not the final newline
        assert record[key] == pytest.approx(sum(log_probs[t - 1, seq[t]].item() for t in targets), rel=1e-4)
    assert report["stage"] == "dpo" and report["pairs"] == 1
    assert record["answer"] == chosen
    assert report["preference_accuracy"] == 1.0 and report["log_prob_margin"] > 0
    assert report["greedy_equals_chosen"] == 1.0 and report["greedy_closer_to_chosen"] == 1.0
    assert record["similarity_chosen"] == 1.0 > record["similarity_rejected"]


def test_grpo_prompts_are_scored_by_exact_match_and_pattern(tokenizer, tmp_path, capsys):
    ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                                  add_special_tokens=False)["input_ids"]])
    model = tiny_model()
    memorize(model, ids, steps=120)  # so greedy answers "Add 3 and 4." with "3 + 4 = 7."
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Add 3 and 4.", "answer": " 3 + 4 = 7. ", "pattern": r"\d \+ \d = \d\."},
        {"prompt": "Add 3 and 4.", "answer": "7", "pattern": r"\d+"},
    ])
    report = evaluate(model.eval(), tokenizer, data)
    assert report["stage"] == "grpo" and report["prompts"] == 2
    assert [d["answer"] for d in report["details"]] == ["3 + 4 = 7."] * 2
    assert [d["match"] for d in report["details"]] == [True, False] and report["exact_match"] == 0.5
    assert [d["pattern_match"] for d in report["details"]] == [True, False] and report["pattern_match"] == 0.5
    folder = tmp_path / "final"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert cli_main(["eval", "--model", str(folder), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "exact match     50.0% (1/2)" in out and "answer pattern  50.0%" in out


def test_exact_match_by_skill_for_conversations_and_prompts(tokenizer, tmp_path, capsys):
    ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                                  add_special_tokens=False)["input_ids"]])
    model = tiny_model()
    memorize(model, ids, steps=120)  # greedy answers "Add 3 and 4." with "3 + 4 = 7."
    wrong = [CONVERSATION[0], {"role": "assistant", "content": "3 + 4 = 8."}]
    conversations = write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": CONVERSATION, "skill": "sum"}, {"conversations": wrong, "skill": "sum"},
        {"conversations": CONVERSATION, "skill": "copy"}, {"conversations": wrong}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Add 3 and 4.", "answer": "3 + 4 = 7.", "skill": "sum"},
        {"prompt": "Add 3 and 4.", "answer": "3 + 4 = 8.", "skill": "sum"},
        {"prompt": "Add 3 and 4.", "answer": "3 + 4 = 7.", "skill": "copy"}, {"prompt": "Add 3 and 4.", "answer": "7"}])
    for data in (conversations, prompts):
        report = evaluate(model.eval(), tokenizer, data)
        assert [d["match"] for d in report["details"]] == [True, False, True, False]
        assert [d.get("skill") for d in report["details"]] == ["sum", "sum", "copy", None]
        assert report["by_skill"] == {"sum": {"correct": 1, "total": 2, "exact_match": 0.5},
                                      "copy": {"correct": 1, "total": 1, "exact_match": 1.0}}
    folder = tmp_path / "final"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert cli_main(["eval", "--model", str(folder), "--data", str(conversations)]) == 0
    out = capsys.readouterr().out
    assert "  sum   " in out and "50.0% (1/2)" in out and "100.0% (1/1)" in out
    # Without skill labels the report has no by_skill.
    assert "by_skill" not in evaluate(model, tokenizer, write_jsonl(tmp_path / "plain.jsonl", [{"conversations": CONVERSATION}]))
