"""Distillation: the KL and the loss by hand, the student's own copy as teacher, checks on the teacher,
a run that learns the teacher's distribution and resumes exactly."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.commands.main import main as cli_main
from minimind.commands.train import main as train_main
from minimind.data.batching import collate
from minimind.data.datasets import PretrainDataset, SFTDataset
from minimind.data.tokenizer import load_tokenizer
from minimind.training.distill import distill_loss, distillation_kl
from minimind.training.stages.stage import count_labelled_tokens, language_model_loss

from .conftest import MINIMIND2_TOKENIZER, TINY, assert_same_weights, metrics, pairs_file, train_until_third_save


def tiny_model(seed=0, hidden_size=32, dropout=0.0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2, dropout=dropout))


def test_distillation_kl_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    for temperature in (1.0, 2.0):
        expected = []
        for s_row, t_row in zip(student.tolist(), teacher.tolist()):
            s = [math.exp(v / temperature) for v in s_row]
            t = [math.exp(v / temperature) for v in t_row]
            s, t = [v / sum(s) for v in s], [v / sum(t) for v in t]
            expected.append(sum(ti * math.log(ti / si) for ti, si in zip(t, s)))
        assert distillation_kl(student, teacher, temperature).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (1.0, 1.0), (2.0, 3.0)])
def test_own_copy_as_teacher_gives_exactly_the_cross_entropy(corpus, temperature, alpha):
    """loss = CE + alpha * T^2 * KL: a teacher that predicts what the student predicts adds nothing,
    to the loss or to its gradient."""
    dataset = PretrainDataset([corpus], load_tokenizer(), 16)
    batch = collate([dataset[0], dataset[1], dataset[2]])
    model = tiny_model().train()
    teacher = copy.deepcopy(model).eval()
    normalizer = 2 * count_labelled_tokens(batch)  # as if a second micro-batch followed
    loss, stats = distill_loss(model, batch, normalizer, {"teacher": teacher, "temperature": temperature, "alpha": alpha})
    loss.backward()
    distill_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ce, _ = language_model_loss(model, batch, normalizer)
    ce.backward()
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(ce.item(), abs=1e-6) and stats["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    for mine, plain in zip(distill_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(mine, plain, atol=1e-7)


def test_distill_loss_by_hand_on_answer_tokens(conversations):
    dataset = SFTDataset([conversations], load_tokenizer(), 64)
    batch = collate([dataset[0], dataset[1]])
    model, teacher = tiny_model(0).train(), tiny_model(1).eval()
    temperature, alpha = 2.0, 0.3
    loss, stats = distill_loss(model, batch, count_labelled_tokens(batch),
                               {"teacher": teacher, "temperature": temperature, "alpha": alpha})
    with torch.no_grad():
        student_logits, teacher_logits = model(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits
    ce_terms, kl_terms = [], []
    for row in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = batch["labels"][row, t + 1].item()
            if target == -100:  # only the assistant's tokens count, for both terms
                continue
            s, q = student_logits[row, t], teacher_logits[row, t]
            ce_terms.append(F.cross_entropy(s[None], torch.tensor([target])).item())
            p_teacher = F.softmax(q / temperature, -1)
            kl_terms.append((p_teacher * (p_teacher.log() - F.log_softmax(s / temperature, -1))).sum().item())
    ce, kl = sum(ce_terms) / len(ce_terms), sum(kl_terms) / len(kl_terms)
    assert stats["ce"].item() == pytest.approx(ce, rel=1e-5) and stats["kl"].item() == pytest.approx(kl, rel=1e-4)
    assert loss.item() == pytest.approx(ce + alpha * temperature ** 2 * kl, rel=1e-5)


def save_teacher(path, seed=5, hidden_size=64, tokenizer=None, **config):
    torch.manual_seed(seed)
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, **config))
    teacher.save_pretrained(path)
    (tokenizer or load_tokenizer()).save_pretrained(path)
    return path


def test_teachers_that_cannot_teach_are_refused(corpus, tmp_path, capsys):
    args = ["train"] + TINY + ["--data", str(corpus), "--stage", "distill", "--max_steps", "1",
                               "--output_dir", str(tmp_path / "out")]
    wide = save_teacher(tmp_path / "wide", vocab_size=7000)
    other = save_teacher(tmp_path / "other", tokenizer=load_tokenizer(str(MINIMIND2_TOKENIZER)))
    capsys.readouterr()
    for teacher, message in ((wide, "its vocabulary has 7000 tokens, the student's 6400"),
                             (other, "differs from the student's (--tokenizer)")):
        assert cli_main(args + ["--teacher", str(teacher)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert cli_main(args) == 2
    assert "--stage distill needs --teacher" in capsys.readouterr().err
    pairs = pairs_file(tmp_path)  # distillation reads text or conversations, not preference pairs
    assert cli_main(args + ["--teacher", str(save_teacher(tmp_path / "fine")), "--data", str(pairs)]) == 2
    assert f"--stage distill does not match the data: {pairs} holds dpo records" in capsys.readouterr().err


def test_distillation_learns_the_teacher_and_resumes_exactly(conversations, tmp_path, monkeypatch):
    """On conversations (answer tokens only); the KL to the teacher falls, and a run cut at its third
    checkpoint and resumed ends with the same weights."""
    teacher = save_teacher(tmp_path / "teacher", initializer_range=0.5)  # large weights: a confident teacher
    args = TINY + ["--data", str(conversations), "--stage", "distill", "--teacher", str(teacher), "--max_seq_len", "48",
                   "--epochs", "2", "--save_steps", "3", "--learning_rate", "2e-2", "--distill_temperature", "2",
                   "--distill_alpha", "2"]
    assert train_main(args + ["--output_dir", str(tmp_path / "ref")]) == 0
    validations = [r for r in metrics(tmp_path / "ref") if "val_kl" in r]
    assert validations[-1]["val_kl"] < 0.75 * validations[0]["val_kl"], validations
    train_until_third_save(args, tmp_path / "cut", monkeypatch)
    assert train_main(args + ["--output_dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_weights(torch.load(tmp_path / "cut" / "model_final.pth", weights_only=True),
                        torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True))
