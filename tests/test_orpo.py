"""ORPO: the loss against the formula computed by hand, and a training run that learns the preference."""
import math

import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.commands.train import main as train_main
from minimind.data.batching import collate
from minimind.data.datasets import DPODataset
from minimind.data.tokenizer import load_tokenizer
from minimind.training.stages import STAGES
from minimind.training.stages.orpo import loss as orpo_loss

from .conftest import TINY, metrics, pairs_file


def by_hand(model, item, weight):
    """NLL(chosen) + weight * -log sigmoid(log odds(chosen) - log odds(rejected)) for one pair, from the
    logits, in float64: P(y | x) = exp(mean log-probability of the response's tokens)."""
    def mean_log_prob(ids, labels):
        log_probs = model(ids[None]).logits[0].double().log_softmax(-1)
        picked = [log_probs[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100]
        return sum(picked) / len(picked)
    chosen = mean_log_prob(item["chosen_input_ids"], item["chosen_labels"])
    rejected = mean_log_prob(item["rejected_input_ids"], item["rejected_labels"])
    odds = [math.exp(p) / (1 - math.exp(p)) for p in (chosen, rejected)]
    ratio = math.log(odds[0]) - math.log(odds[1])
    return -chosen + weight * -math.log(1 / (1 + math.exp(-ratio))), ratio


def test_orpo_loss_is_the_formula_by_hand(tmp_path):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).eval()
    items = [DPODataset([pairs_file(tmp_path)], load_tokenizer(), 64)[i] for i in range(3)]
    batch = collate(items, STAGES["orpo"].rows)
    loss, metrics = orpo_loss(model, batch, 3, {"orpo_lambda": 0.7})
    expected = [by_hand(model, item, 0.7) for item in items]
    assert abs(loss.item() - sum(value for value, _ in expected) / 3) < 1e-5
    assert abs(metrics["log_odds_ratio"].item() - sum(ratio for _, ratio in expected) / 3) < 1e-5
    # micro-batches of one step add up to the whole step's mean
    parts = [orpo_loss(model, collate(part, STAGES["orpo"].rows), 3, {"orpo_lambda": 0.7})[0] for part in
             (items[:1], items[1:])]
    assert abs(sum(parts).item() - loss.item()) < 1e-5


def test_orpo_training_raises_preference_accuracy(tmp_path):
    data = pairs_file(tmp_path)
    out = tmp_path / "orpo"
    assert train_main(TINY + ["--data", str(data), "--eval_data", str(data), "--stage", "orpo", "--epochs", "4",
                              "--learning_rate", "5e-3", "--orpo_lambda", "1", "--output_dir", str(out),
                              "--log_interval", "1"]) == 0
    rows = [r for r in metrics(out) if "val_accuracy" in r]
    assert rows[-1]["val_accuracy"] >= 0.9 > rows[0]["val_accuracy"]
    assert rows[-1]["val_odds_ratio"] < rows[0]["val_odds_ratio"] and rows[-1]["val_sft"] < rows[0]["val_sft"]
