"""DPO: the loss against a hand computation, the log-probabilities, and a training run."""
import math

import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.commands.train import main as train_main
from minimind.data.batching import collate
from minimind.data.datasets import DPODataset
from minimind.data.tokenizer import load_tokenizer
from minimind.training.dpo import dpo_batch_loss, dpo_loss, make_reference
from minimind.training.stages.dpo import pair_rows

from .conftest import TINY, assert_same_weights, metrics, pairs_file, train_until_third_save


def test_dpo_loss_by_hand():
    policy_chosen, policy_rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    reference_chosen, reference_rejected = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta = 0.1
    loss, stats = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    margins = [beta * ((-10 + 11) - (-12 + 11.5)), beta * ((-4 + 5) - (-3 + 2))]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert abs(stats["margin"].item() - sum(margins) / 2) < 1e-6
    assert stats["accuracy"].item() == 1.0


def test_sequence_log_probs_sum_only_response_tokens():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                               vocab_size=7)).eval()
    ids = torch.tensor([[1, 5, 3, 4, 6]])
    labels = torch.tensor([[-100, -100, 3, 4, -100]])
    logp = model(ids).logits.log_softmax(-1)
    sums, counts = model.sequence_log_probs(ids, labels)
    assert torch.allclose(sums, logp[0, 1, 3] + logp[0, 2, 4]) and counts.tolist() == [2]


def test_reference_starts_equal_so_first_loss_is_log2(tmp_path):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).train()
    reference = make_reference(model)
    assert all(not p.requires_grad for p in reference.parameters())
    dataset = DPODataset([pairs_file(tmp_path)], load_tokenizer(), 64)
    loss, stats = dpo_batch_loss(model, collate([dataset[0], dataset[1]], pair_rows), 0.1, reference)
    assert abs(loss.item() - math.log(2)) < 1e-5 and abs(stats["margin"].item()) < 1e-6
    assert stats["accuracy"].item() == 0.5  # ties are coin flips


def test_dpo_training_raises_preference_accuracy(tmp_path):
    data = pairs_file(tmp_path)
    out = tmp_path / "dpo"
    assert train_main(TINY + ["--data", str(data), "--eval_data", str(data), "--epochs", "4", "--learning_rate", "5e-3",
                              "--dpo_beta", "0.5", "--output_dir", str(out), "--log_interval", "1"]) == 0
    rows = [r for r in metrics(out) if "val_accuracy" in r]
    assert rows[-1]["val_accuracy"] >= 0.9 and rows[-1]["val_loss"] < rows[0]["val_loss"]


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]], ids=["full", "lora"])
def test_dpo_resume_after_an_interruption_is_exact(tmp_path, monkeypatch, lora):
    """The reference stays the starting weights across a resume, so the resumed run ends where an uninterrupted one does."""
    base_dir = tmp_path / "base"
    torch.manual_seed(3)
    MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)).save_pretrained(base_dir)
    load_tokenizer().save_pretrained(base_dir)
    args = TINY[8:] + lora + ["--data", str(pairs_file(tmp_path)), "--pretrained_path", str(base_dir), "--epochs", "2",
                              "--save_steps", "3", "--learning_rate", "5e-3", "--dpo_beta", "0.5"]
    assert train_main(args + ["--output_dir", str(tmp_path / "ref")]) == 0
    train_until_third_save(args, tmp_path / "cut", monkeypatch)
    assert train_main(args + ["--output_dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_weights(torch.load(tmp_path / "cut" / "model_final.pth", weights_only=True),
                        torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True))
    validations = [[r for r in metrics(tmp_path / run) if "val_accuracy" in r] for run in ("cut", "ref")]
    assert validations[0] == validations[1]
