"""GRPO: advantages and the loss against hand computations, rewards, a run that raises its reward,
a reward that is always zero, exact resume."""
import json
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.commands.train import main as train_main
from minimind.commands.train import parse as parse_train_args
from minimind.data.batching import collate
from minimind.data.datasets import PromptDataset
from minimind.data.tokenizer import load_tokenizer
from minimind.errors import UserError
from minimind.training.grpo import ADVANTAGE_EPS, GRPOHelpers, group_advantages, grpo_loss, sequence_losses
from minimind.training.rewards import load_rewards, score_answers
from minimind.training.stages.grpo import prompt_rows

from .conftest import TINY, assert_same_weights, metrics, train_until_third_save

ROOT = Path(__file__).resolve().parents[1]

REWARDS = '''
def latin(prompt, answer, record):
    """The share of the answer's characters that are Latin letters: about half of a random model's."""
    return sum(c.isascii() and c.isalpha() for c in answer) / max(1, len(answer))

def by_length(prompt, answer, record):
    return float(len(answer) % 3)

def zero(prompt, answer, record):
    return 0.0

def not_a_number(prompt, answer, record):
    return "high"

def two_flat(prompt, answer, record):
    """0 for the prompts apple and river whatever the answer (their groups teach nothing), else latin."""
    return 0.0 if record["answer"] in ("apple", "river") else latin(prompt, answer, record)
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def prompts_file(tmp_path, count=16):
    path = tmp_path / "prompts.jsonl"
    words = "apple river stone cloud lemon grape horse candle garden window silver planet forest rabbit pencil tiger"
    rows = [{"prompt": f"Say a word like {word}.", "answer": word, "pattern": "[a-z]+"} for word in words.split()[:count]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2, dropout=0.0))


# ---------------------------------------------------------------- the pieces, by hand

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, 2.0, 1.0, 0.0, 1.0])
    advantages, spread = group_advantages(rewards, 4)
    expected = []
    for group in ([1, 0, 0, 1], [0.3] * 4, [2, 1, 0, 1]):
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 4)
        expected += [0.0] * 4 if std < 1e-12 else [(r - mean) / (std + ADVANTAGE_EPS) for r in group]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert spread.tolist() == pytest.approx([0.5, 0.0, math.sqrt(0.5)], abs=1e-6)
    assert spread[1].item() == 0.0 and advantages[4:8].eq(0).all()  # equal rewards: exactly no signal


def test_clipped_objective_and_kl_by_hand():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -0.5], [-1.5, -1.0, 0.0]])
    ref = torch.tensor([[-1.2, -2.5, -0.1], [-0.8, -2.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    clip, beta = 0.2, 0.1
    losses, kl = sequence_losses(log_probs, old, ref, advantages, mask, clip, beta)
    expected_losses, expected_kl = [], []
    for row in range(2):
        terms, kls = [], []
        for t in range(3 if row == 0 else 2):
            ratio = math.exp(log_probs[row, t].item() - old[row, t].item())
            a = advantages[row].item()
            surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            d = ref[row, t].item() - log_probs[row, t].item()
            kls.append(math.exp(d) - d - 1)
            terms.append(-surrogate + beta * kls[-1])
        expected_losses.append(sum(terms) / len(terms))
        expected_kl.append(sum(kls) / len(kls))
    assert losses.tolist() == pytest.approx(expected_losses, abs=1e-6)
    assert kl.tolist() == pytest.approx(expected_kl, abs=1e-6)
    losses.sum().backward()
    # ratio e^0.5 > 1.2 with A > 0: clipped, so only the KL term moves that token;
    # ratio e^-1 < 0.8 with A < 0: clipped too. The unclipped ones carry -A * ratio / tokens.
    for row, t in ((0, 0), (1, 1)):
        d = ref[row, t].item() - log_probs[row, t].item()
        tokens = 3 if row == 0 else 2
        assert log_probs.grad[row, t].item() == pytest.approx(beta * (1 - math.exp(d)) / tokens, abs=1e-6)
    assert log_probs.grad[0, 1].item() == pytest.approx((-math.exp(-1.0) + beta * (1 - math.exp(-0.5))) / 3, abs=1e-6)
    assert log_probs.grad[1, 2].item() == 0.0  # not an answer token


def test_rewards_load_combine_and_fail_clearly(reward_file, monkeypatch):
    rewards = load_rewards(["exact_match=2", f"{reward_file}:by_length=0.5", "answer_pattern"])
    records = [{"prompt_messages": [{"role": "user", "content": "q"}], "answer": "ab",
                "fields": {"answer": "ab", "pattern": "a+b"}}] * 3
    total, values = score_answers(rewards, records, [" ab ", "abcd", "aab"])
    assert values["exact_match"].tolist() == [1, 0, 0] and values["answer_pattern"].tolist() == [1, 0, 1]
    assert total.tolist() == pytest.approx([2 + 0.5 * 1 + 1, 0.5 * 1, 0.5 * 0 + 1])
    monkeypatch.chdir(reward_file.parent)  # module:function imports from the current directory
    assert load_rewards(["my_rewards:zero"])[0].function("q", "a", {}) == 0.0
    for spec, message in [("exact_match=x", "the weight after '=' must be a number"),
                          ("nonesuch", "neither a built-in reward"),
                          ("no_such_module:f", "cannot import no_such_module"),
                          ("my_rewards:missing", "has no function missing"),
                          ("exact_match=inf", "finite weight")]:
        with pytest.raises(UserError, match=message):
            load_rewards([spec])
    with pytest.raises(UserError, match="returned 'high' for the prompt 'q'; a reward must be a finite number"):
        score_answers(load_rewards(["my_rewards:not_a_number"]), records[:1], ["a"])
    with pytest.raises(UserError, match='needs a "pattern" field'):
        score_answers(load_rewards(["answer_pattern"]), [{**records[0], "fields": {"answer": "ab"}}], ["a"])


def test_the_numbers_reward_gives_the_share_of_the_references_numbers_written_at_their_places():
    numbers = load_rewards(["numbers"])[0]
    reference = "Subtracting 2 from 7 leaves 5."
    answers = [reference, " Subtracting 2 from 7 leaves 4. ", "Subtracting 7 from 14 leaves 7.",
               "Subtracting 2 from 7 leaves 5 or 6.", "2 7", "Leaves 5.", "2.5 from 7 leaves 5."]
    records = [{"prompt_messages": [{"role": "user", "content": "Subtract 2 from 7."}],
                "fields": {"answer": reference}}] * len(answers)
    assert numbers.scores(records, answers) == pytest.approx([1, 2 / 3, 0, 3 / 4, 2 / 3, 0, 2 / 3])
    words = [{**records[0], "fields": {"answer": "The river is the Ellsarn."}}] * 2
    assert numbers.scores(words, ["The river is the Ellsarn. ", "The river is the Tem."]) == [1, 0]
    with pytest.raises(UserError, match="has no reference answer"):
        numbers.scores([{**records[0], "fields": {}}], ["5"])


# ---------------------------------------------------------------- the stage's loss on a tiny batch

def grpo_setup(tmp_path, reward, extra=()):
    model = tiny_model().train()
    config = parse_train_args(["--grpo_group_size", "3", "--grpo_max_new_tokens", "5", "--grpo_kl_beta", "0.5",
                               "--reward", reward, *extra])
    dataset = PromptDataset([prompts_file(tmp_path)], load_tokenizer(), 64)
    helpers = GRPOHelpers(model, config, dataset)
    return model, helpers, collate([dataset[0], dataset[1]], prompt_rows)


def test_grpo_loss_matches_a_hand_computation(tmp_path, reward_file, monkeypatch):
    model, helpers, batch = grpo_setup(tmp_path, f"{reward_file}:by_length")
    with torch.no_grad():  # a reference that differs from the policy, so the KL term counts
        for p in helpers.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    import minimind.training.grpo as grpo
    sampled = {}

    def recording(*args, **kwargs):
        sampled["answers"], sampled["texts"], _ = result = real_sample(*args, **kwargs)
        return result
    real_sample = grpo.sample_answers
    monkeypatch.setattr(grpo, "sample_answers", recording)
    loss, stats = grpo_loss(model, batch, 2, helpers)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    rewards = [float(len(text) % 3) for text in sampled["texts"]]
    assert len(set(rewards)) > 1, "the test needs rewards that differ"
    hand = 0.0
    for p, prompt in enumerate(prompts):
        group = rewards[3 * p:3 * p + 3]
        mean = sum(group) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        group_loss = 0.0
        for i in range(3):
            answer = sampled["answers"][3 * p + i]
            advantage = 0.0 if std == 0 else (group[i] - mean) / (std + ADVANTAGE_EPS)
            ids = torch.tensor([prompt + answer])
            logp = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            with torch.no_grad():
                ref = helpers.reference(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            taken = torch.tensor(answer)
            logp, ref = logp[torch.arange(len(answer)), taken], ref[torch.arange(len(answer)), taken]
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            group_loss = group_loss + (-advantage * torch.exp(logp - logp.detach()) + 0.5 * kl).mean() / 3
        hand = hand + group_loss / 2
    assert loss.item() == pytest.approx(hand.item(), abs=1e-5)
    assert stats["reward"].item() == pytest.approx(sum(rewards) / 6, abs=1e-6)
    hand.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_a_reward_that_is_always_zero_gives_no_gradient(tmp_path, reward_file):
    model, helpers, batch = grpo_setup(tmp_path, f"{reward_file}:zero")
    loss, stats = grpo_loss(model, batch, 2, helpers)
    loss.backward()
    # all advantages are 0, and the policy is the reference, where the k3 KL has a zero gradient
    assert stats["kl"].item() == 0.0 and stats["no_signal"].item() == 1.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model, helpers, batch = grpo_setup(tmp_path, f"{reward_file}:by_length")  # the contrast: a signal moves it
    grpo_loss(model, batch, 2, helpers)[0].backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_dynamic_sampling_replaces_the_groups_without_signal(tmp_path, reward_file):
    """--grpo_resample: a group whose rewards are all equal is replaced by another training prompt's
    group, its prompt, record, answers and rewards together."""
    from minimind.training.grpo import Groups, resample_flat_groups
    model, helpers, batch = grpo_setup(tmp_path, f"{reward_file}:two_flat")  # prompts apple and river: no signal
    _, stats = grpo_loss(model, batch, 2, helpers)
    assert stats["no_signal"].item() == 1.0 and "resampled" not in stats

    model, helpers, batch = grpo_setup(tmp_path, f"{reward_file}:two_flat", ["--grpo_resample", "3"])
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    records = list(batch["records"])
    groups = Groups(model, helpers, prompts, records, 3, 1.0)
    assert groups.flat() == [0, 1]
    indices = list(batch["indices"])
    replaced = resample_flat_groups(model, helpers, prompts, records, indices, groups, 1.0)
    kept = [record["fields"]["answer"] for record in records]
    assert replaced >= 2 and groups.flat() == [] and not {"apple", "river"} & set(kept)
    dataset = helpers.train_set
    words = [dataset[i]["record"]["fields"]["answer"] for i in range(len(dataset))]
    assert indices == [words.index(word) for word in kept]
    assert prompts == [dataset[index]["input_ids"].tolist() for index in indices]
    assert helpers.flat[[0, 1]].all()  # the groups replaced had no signal
    # each slot's answers belong to its prompt: the rewards recomputed from the texts and records agree
    rescored, _ = score_answers(helpers.rewards, [r for r in records for _ in range(3)], groups.texts)
    assert torch.equal(rescored, groups.rewards)
    eos = helpers.tokenizer.eos_token_id
    assert [helpers.tokenizer.decode([t for t in a if t != eos]) for a in groups.answers] == groups.texts
    assert groups.lengths.tolist() == [len(a) - (a[-1:] == [eos]) for a in groups.answers]

    model, helpers, batch = grpo_setup(tmp_path, f"{reward_file}:two_flat", ["--grpo_resample", "3"])
    _, stats = grpo_loss(model, batch, 2, helpers)  # the same draws inside the loss
    assert stats["no_signal"].item() == 0.0 and stats["resampled"].item() == replaced / 2


def test_prioritize_replaces_prompts_whose_last_group_had_no_signal(tmp_path, reward_file):
    """--grpo_prioritize: the loss remembers which prompts' groups had no signal; such a prompt is
    replaced before sampling by a training prompt drawn mostly among the others; the memory is kept
    by a checkpoint."""
    from minimind.training.grpo import FLAT_WEIGHT, prioritize
    model, helpers, batch = grpo_setup(tmp_path, f"{reward_file}:two_flat", ["--grpo_prioritize"])
    _, stats = grpo_loss(model, batch, 2, helpers)  # nothing known yet: apple and river sampled, no signal
    assert stats["no_signal"].item() == 1.0 and helpers.flat.tolist() == [True, True] + [False] * 14
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    records, indices = list(batch["records"]), list(batch["indices"])
    assert prioritize(helpers, prompts, records, indices) == 2
    assert not {0, 1} & set(indices) and len(set(indices)) == 2
    dataset = helpers.train_set
    assert prompts == [dataset[i]["input_ids"].tolist() for i in indices]
    assert records == [dataset[i]["record"] for i in indices]
    _, stats = grpo_loss(model, batch, 2, helpers)  # the same batch now samples two other prompts
    assert stats["no_signal"].item() < 1.0 and stats["prioritized"].item() == 1.0

    helpers.flat[:] = True  # every prompt flat but one: drawn about 1 / (1 + 14 * FLAT_WEIGHT) of the time
    helpers.flat[7] = False
    draws = []
    for _ in range(200):
        one = [0]
        prioritize(helpers, [[1]], [{}], one)
        draws.append(one[0])
    assert abs(draws.count(7) / 200 - 1 / (1 + 14 * FLAT_WEIGHT)) < 0.1 and 0 not in draws
    state = helpers.state_dict()
    _, fresh, _ = grpo_setup(tmp_path, f"{reward_file}:two_flat", ["--grpo_prioritize"])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.flat, helpers.flat)


# ---------------------------------------------------------------- training runs

def saved_base(tmp_path):
    base = tmp_path / "base"
    tiny_model(seed=3).save_pretrained(base)
    load_tokenizer().save_pretrained(base)
    return base


def grpo_args(tmp_path, reward, extra=()):
    return TINY[8:] + ["--data", str(prompts_file(tmp_path)), "--pretrained_path", str(saved_base(tmp_path)),
                       "--grpo_group_size", "4", "--grpo_max_new_tokens", "6", "--reward", reward,
                       "--log_interval", "1", "--max_seq_len", "64", *extra]


def test_always_zero_reward_changes_no_weight(tmp_path, reward_file):
    args = grpo_args(tmp_path, f"{reward_file}:zero", ["--max_steps", "3", "--weight_decay", "0"])
    assert train_main(args + ["--output_dir", str(tmp_path / "zero")]) == 0
    start = MiniMindForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert_same_weights(torch.load(tmp_path / "zero" / "model_final.pth", weights_only=True), start)
    rows = [r for r in metrics(tmp_path / "zero") if "reward" in r]
    assert all(r["reward"] == 0 and r["kl"] == 0 and r["no_signal"] == 1 for r in rows)


@pytest.mark.long
def test_grpo_raises_the_reward(tmp_path, reward_file):
    # a tiny random model's tokens share no structure: only a large step makes the sampled good
    # tokens win within a few steps. How far one run gets in 3 epochs depends on the draws and on
    # the CPU's arithmetic (lr 1e-1 amplifies the last bits): seed 1 rose by 0.60 on one machine and
    # by 0.22 on another, seed 4 by 0.17. So the test asks it of three seeds on average.
    rises = []
    for seed in (1, 2, 3):
        out = tmp_path / f"run{seed}"
        args = grpo_args(tmp_path, f"{reward_file}:latin", ["--epochs", "3", "--learning_rate", "1e-1",
                                                            "--grpo_kl_beta", "0", "--val_fraction", "0",
                                                            "--seed", str(seed)])
        assert train_main(args + ["--output_dir", str(out)]) == 0
        rewards = [r["reward"] for r in metrics(out) if "reward" in r]
        rises.append(sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3)
    assert sum(rises) / len(rises) > 0.25, rises


@pytest.mark.parametrize("extra, reward", [([], "latin"), (["--lora_rank", "4"], "latin"),
                                           (["--grpo_resample", "2"], "two_flat"), (["--grpo_prioritize"], "two_flat")],
                         ids=["full", "lora", "resample", "prioritize"])
def test_grpo_resume_after_an_interruption_is_exact(tmp_path, monkeypatch, reward_file, extra, reward):
    """The sampling generator's state is in the checkpoint: a resumed run samples the same answers
    (and, with --grpo_resample or --grpo_prioritize, draws the same replacement prompts)."""
    args = grpo_args(tmp_path, f"{reward_file}:{reward}", extra + ["--epochs", "2", "--save_steps", "3",
                                                                   "--learning_rate", "5e-3"])
    assert train_main(args + ["--output_dir", str(tmp_path / "ref")]) == 0
    train_until_third_save(args, tmp_path / "cut", monkeypatch)
    assert train_main(args + ["--output_dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_weights(torch.load(tmp_path / "cut" / "model_final.pth", weights_only=True),
                        torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True))
    rows = [[(r["step"], r.get("reward"), r.get("val_reward"), r.get("resampled")) for r in metrics(tmp_path / run)]
            for run in ("cut", "ref")]
    assert rows[0] == rows[1]
    assert ("--grpo_resample" in extra) == any(row[3] for row in rows[1])


def test_a_generator_state_from_another_device_resumes_from_a_derived_seed(tmp_path, reward_file):
    """A GPU run's checkpoint holds a CUDA generator state (16 bytes: seed and offset), which a CPU
    generator cannot take: sampling continues from a seed derived from it, the same every time."""
    gpu_state = {"generator": torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)}
    draws = []
    for _ in range(2):
        _, helpers, _ = grpo_setup(tmp_path, f"{reward_file}:by_length")
        with pytest.warns(UserWarning, match="saved on another kind of device"):
            helpers.load_state_dict(gpu_state)
        draws.append(torch.rand(4, generator=helpers.generator))
    assert torch.equal(draws[0], draws[1])
    _, fresh, _ = grpo_setup(tmp_path, f"{reward_file}:by_length")
    assert not torch.equal(draws[0], torch.rand(4, generator=fresh.generator))


# ---------------------------------------------------------------- MiniMind's RL prompt sets, scored by a reward model

def rlaif_file(tmp_path, count=16):
    """MiniMind's RL prompt layout (its rlaif.jsonl): conversations whose last assistant turn is empty."""
    path = tmp_path / "rlaif.jsonl"
    words = "apple river stone cloud lemon grape horse candle garden window silver planet forest rabbit pencil tiger"
    rows = [{"conversations": [{"role": "user", "content": f"Say a word like {word}."},
                               {"role": "assistant", "content": ""}]} for word in words.split()[:count]]
    rows[1]["conversations"][:0] = [{"role": "system", "content": "You are a helpful AI assistant."},
                                    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_reward_model(folder, seed=0):
    """A reward model's shape (a decoder with a one-output head, as internlm2-1_8b-reward or TRL's
    reward models), a few thousand random weights, with the bundled tokenizer and its chat template."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tokenizer = load_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_minimind_rl_prompts_are_prompts_without_a_reference():
    from minimind.data.records import CONVERSATIONS, PROMPTS, normalize
    tools = json.dumps([{"type": "function", "function": {"name": "get_time", "parameters": {}}}])
    record_format, record = normalize({"conversations": [{"role": "system", "content": "Be brief.", "tools": tools},
                                                         {"role": "user", "content": "Time?"},
                                                         {"role": "assistant", "content": ""}]})
    assert record_format == PROMPTS and record["answer"] is None and record["tools"] == json.loads(tools)
    assert [m["role"] for m in record["prompt_messages"]] == ["system", "user"]
    assert normalize({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})[0] \
        == CONVERSATIONS  # an answered conversation stays SFT
    with pytest.raises(UserError, match='has no reference answer \\("answer"\\).*--reward PATH_TO_MODEL'):
        score_answers(load_rewards(["exact_match"]), [{**record, "fields": {"conversations": []}}], ["12:00"])


def test_a_reward_model_scores_each_prompt_and_answer_as_one_conversation(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder = tiny_reward_model(tmp_path / "reward_model")
    dataset = PromptDataset([rlaif_file(tmp_path)], load_tokenizer(), 128)
    records = [dataset[i]["record"] for i in range(3)]
    answers = ["apple", "A much longer answer about the river and the stone.", ""]  # padded together in a batch
    total, values = score_answers(load_rewards([f"{folder}=2"]), records, answers)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for record, answer, value in zip(records, answers, values[str(folder)].tolist()):  # one at a time, by hand
        text = tokenizer.apply_chat_template(record["prompt_messages"] + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        assert text.endswith(f"<|im_start|>assistant\n{answer}<|im_end|>\n")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert value == pytest.approx(model(ids).logits[0, 0].item(), abs=1e-5)
    assert torch.allclose(total, 2 * values[str(folder)]) and len(set(values[str(folder)].tolist())) == 3
    with pytest.raises(UserError, match="cannot load a sequence-classification reward model"):
        load_rewards([str(tmp_path)])


def test_grpo_trains_on_minimind_rl_prompts_with_a_reward_model(tmp_path, capsys):
    folder = tiny_reward_model(tmp_path / "reward_model")
    args = TINY[8:] + ["--data", str(rlaif_file(tmp_path)), "--pretrained_path", str(saved_base(tmp_path)),
                       "--grpo_group_size", "3", "--grpo_max_new_tokens", "4", "--max_seq_len", "64",
                       "--max_steps", "2", "--log_interval", "1"]
    assert train_main(args + ["--stage", "grpo", "--reward", str(folder), "--output_dir", str(tmp_path / "a")]) == 0
    rows = [r for r in metrics(tmp_path / "a") if "reward" in r]
    assert len(rows) == 2 and all(r["reward_std"] > 0 for r in rows)  # the reward model tells the answers apart
    capsys.readouterr()
    assert train_main(args + ["--output_dir", str(tmp_path / "b")]) == 2  # the stage from the data; exact_match
    assert "has no reference answer" in capsys.readouterr().err
    assert train_main(args + ["--stage", "sft", "--output_dir", str(tmp_path / "c")]) == 2
    assert "holds grpo records" in capsys.readouterr().err


def test_the_rollouts_benchmark_runs(capsys, monkeypatch, tmp_path):
    """bench/grpo_rollouts.py on a tiny shape: it reads the demo prompts through PromptDataset (it broke
    once when the dataset's samples became cache indices) and prints each decoder's answer tokens/s; started
    outside the repository, it finds the bundled prompts by itself."""
    script = ROOT / "bench" / "grpo_rollouts.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--hidden_size", "32", "--num_hidden_layers", "1", "--steps", "1",
                                      "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "3"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert not done.value.code
    printed = capsys.readouterr().out
    for decoder in ("plain", "ours", "ours int8"):
        assert re.search(rf"^{decoder} +[\d.]+ answer tokens/s", printed, re.M), printed
