"""The training loop: loss falls, SFT trains on answers only, runs resume exactly after a kill."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minimind import MiniMindConfig, load_model
from minimind.cli import main as cli_main
from minimind.data import SFTDataset, collate
from minimind.tokenizer import load_tokenizer
from minimind.stages import count_labelled_tokens, language_model_loss
from minimind.train_config import build_parser, parse_train_args
from minimind.trainer import main as train_main

from .conftest import MINIMIND3_CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden_size", "32", "--num_layers", "2", "--num_heads", "4", "--num_key_value_heads", "2",
        "--max_seq_len", "32", "--batch_size", "4", "--device", "cpu", "--report_to", "none", "--sample_tokens", "8"]


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    docs = [f"The river {name} runs past the town of {town}. It is {n} kilometres long." for n, (name, town) in
            enumerate([("Aun", "Velwen"), ("Mira", "Tosk"), ("Kel", "Brae"), ("Ost", "Lumen")] * 12)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture
def conversations(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = []
    for a in range(1, 41):
        rows.append({"conversations": [{"role": "user", "content": f"What is {a} + {a}?"},
                                       {"role": "assistant", "content": f"{2 * a}."},
                                       {"role": "user", "content": "And doubled?"},
                                       {"role": "assistant", "content": f"{4 * a}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_pretraining_loss_falls(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(TINY + ["--data", str(corpus), "--epochs", "4", "--learning_rate", "3e-3",
                              "--output_dir", str(out), "--log_interval", "1"]) == 0
    peak = re.search(r"Peak memory: (\d+) MiB resident", capsys.readouterr().out)
    assert peak and 50 < int(peak.group(1)) < 100_000  # python + torch alone are more than 50 MiB
    rows = metrics(out)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    train = [r["loss"] for r in rows if "loss" in r]
    assert val[-1] < val[0] - 1.0
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 1.0
    for name in ("model_epoch_1.pth", "model_epoch_4.pth", "model_final.pth", "loss.png", "run_config.yaml",
                 "checkpoint.pt", "final/config.json", "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).exists(), name
    # the original format: original parameter names, loadable strictly into a model of the same shape
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert "lm_head.weight" in state and "model.layers.1.mlp.gate_proj.weight" in state
    model = load_model(out / "final")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2


def test_sft_loss_counts_only_assistant_tokens(conversations):
    tokenizer = load_tokenizer()
    dataset = SFTDataset([conversations], tokenizer, max_seq_len=64)
    batch = collate([dataset[0], dataset[1]])
    from minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).eval()
    loss, _ = language_model_loss(model, batch, count_labelled_tokens(batch))
    logits = model(batch["input_ids"]).logits.log_softmax(-1)
    terms = []
    for row in range(2):
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
        text = tokenizer.decode(ids[mask.bool()])
        for t in range(1, int(mask.sum())):
            # count a token only if it lies inside an assistant turn (content or its closing <|im_end|>)
            prefix = tokenizer.decode(ids[:t])
            in_answer = prefix.rfind("<|im_start|>assistant\n") > prefix.rfind("<|im_end|>")
            if in_answer:
                terms.append(-logits[row, t - 1, ids[t]])
        assert text.count("<|im_start|>assistant") == 2
    assert abs(loss.item() - torch.stack(terms).mean().item()) < 1e-5


def test_flags_and_config_file_round_trip(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_main(TINY + ["--data", str(corpus), "--max_steps", "2", "--output_dir", str(out),
                              "--learning_rate", "5e-4", "--warmup_steps", "1"]) == 0
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["learning_rate"] == 5e-4 and saved["hidden_size"] == 32 and saved["max_steps"] == 2
    replay = parse_train_args(["--config", str(out / "run_config.yaml")]).flags()
    for key, value in saved.items():
        assert replay[key] == value, key
    # command-line flags win over the file
    assert parse_train_args(["--config", str(out / "run_config.yaml"), "--epochs", "7"]).optim.epochs == 7
    help_text = build_parser().format_help()
    for flag in ("--hidden_size", "--num_layers", "--num_heads", "--vocab_size", "--max_seq_len", "--dropout",
                 "--use_moe", "--epochs", "--batch_size", "--learning_rate", "--weight_decay", "--grad_clip",
                 "--num_workers", "--device", "--output_dir", "--pretrained_path", "--log_interval",
                 "--save_interval", "--data", "--stage", "--tokenizer", "--num_key_value_heads",
                 "--accumulation_steps", "--dtype", "--max_steps", "--eval_interval", "--seed", "--resume",
                 "--save_steps", "--config"):
        assert flag in help_text, flag


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("learning_rate: 1e-3\nlearnin_rate: 2\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "learnin_rate" in err and str(bad) in err and len(err.splitlines()) == 1


def test_pretrained_original_checkpoint_shapes_come_from_it(seed_checkpoints, corpus, tmp_path, capsys):
    """An original .pth with a config beside it: no architecture flags needed."""
    ckpt_dir = tmp_path / "orig"
    ckpt_dir.mkdir()
    (ckpt_dir / "model.pth").write_bytes((seed_checkpoints / "dense_tiny_fp16.pth").read_bytes())
    config = json.loads((seed_checkpoints / "dense_tiny_config.json").read_text())
    (ckpt_dir / "config.json").write_text(json.dumps({**config, "model_type": "minimind"}))
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--pretrained_path", str(ckpt_dir / "model.pth"), "--max_steps", "2",
            "--max_seq_len", "32", "--device", "cpu", "--report_to", "none", "--output_dir", str(out), "--sample_tokens", "0"]
    assert train_main(args) == 0
    model = load_model(out / "final")
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size) == (64, 4, 192)
    # a shape flag that contradicts the checkpoint is refused, in one line
    capsys.readouterr()
    assert train_main(args + ["--num_layers", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit" in err and len(err.splitlines()) == 1


def test_minimind3_trains_from_scratch_and_refuses_a_resume_as_minimind2(corpus, tmp_path, capsys):
    out = tmp_path / "mm3"
    args = TINY + ["--model_family", "minimind3", "--data", str(corpus), "--epochs", "3", "--learning_rate", "3e-3",
                   "--log_interval", "1", "--save_steps", "5", "--output_dir", str(out)]
    assert train_main(args) == 0
    assert "model_family: minimind3" in capsys.readouterr().out
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val[-1] < val[0] - 1.0
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert "model.layers.0.self_attn.q_norm.weight" in state and "model.layers.1.self_attn.k_norm.weight" in state
    for written in (out / "final", out / "model_final.pth"):  # both read back as MiniMind-3, with its defaults
        config = load_model(written).config
        assert (config.model_family, config.hidden_size, config.rms_norm_eps, config.intermediate_size) == \
               ("minimind3", 32, 1e-6, 128)  # 64 * ceil(32 * pi / 64)
    assert cli_main(["train"] + args[:-2] + ["--model_family", "minimind2", "--resume", "--output_dir", str(out)]) == 2
    assert "--model_family 'minimind3' -> 'minimind2'" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["bare_pth", "directory"])
def test_pretrained_minimind3_checkpoint_trains(source, corpus, tmp_path, capsys):
    """A bare MiniMind-3 .pth (family and shape from its tensor names) or a Hugging Face style directory."""
    path = MINIMIND3_CHECKPOINTS / "moe3_tiny_fp16.pth"
    if source == "directory":
        load_model(path, num_experts_per_tok=2).save_pretrained(tmp_path / "hf")
        path = tmp_path / "hf"
    out = tmp_path / "run"
    assert train_main(["--data", str(corpus), "--pretrained_path", str(path), "--max_steps", "2", "--max_seq_len", "32",
                       "--device", "cpu", "--report_to", "none", "--output_dir", str(out), "--sample_tokens", "0"]) == 0
    assert "model_family: minimind3" in capsys.readouterr().out
    config = load_model(out / "final").config
    assert (config.model_family, config.use_moe, config.num_experts, config.n_shared_experts, config.head_dim) == \
           ("minimind3", True, 4, 0, 16)
    assert config.num_experts_per_tok == (2 if source == "directory" else 1)  # a bare .pth does not show it
    # asking for the other family is refused, in one line
    assert train_main(["--data", str(corpus), "--pretrained_path", str(path), "--model_family", "minimind2",
                       "--max_steps", "1", "--device", "cpu", "--output_dir", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a MiniMind-3 model but the config says MiniMind2" in err and len(err.splitlines()) == 1


def run_uninterrupted(data, out, extra):
    assert train_main(TINY + ["--data", str(data), "--output_dir", str(out)] + extra) == 0
    return torch.load(out / "model_final.pth", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


RESUME_EXTRA = ["--epochs", "2", "--save_steps", "2", "--log_interval", "1", "--learning_rate", "2e-3", "--dropout", "0.1"]


def test_sigkill_then_resume_gives_identical_weights_and_log(conversations, tmp_path):
    reference = run_uninterrupted(conversations, tmp_path / "ref", RESUME_EXTRA)
    ref_rows = metrics(tmp_path / "ref")
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "train.py")] + TINY + ["--data", str(conversations), "--output_dir", str(out)] + RESUME_EXTRA
    # Same thread count as this process: float sums are ordered per thread, so bitwise-equal
    # continuation needs the same number of threads in every part of the run.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for kill_at in ("Step [3/", "Step [4/"):  # after a checkpoint + 1 step; then mid-way in epoch 2
        process = subprocess.Popen(command + (["--resume"] if (out / "checkpoint.pt").exists() else []),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen = []
        for line in process.stdout:
            seen.append(line)
            if kill_at in line and (kill_at != "Step [4/" or "Epoch [2/2]" in line):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=120)
        assert process.returncode == -signal.SIGKILL, "".join(seen)
    assert train_main(TINY + ["--data", str(conversations), "--output_dir", str(out), "--resume"] + RESUME_EXTRA) == 0
    assert_same_weights(torch.load(out / "model_final.pth", weights_only=True), reference)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for got, want in zip(rows, ref_rows):
        for key in ("loss", "val_loss", "lr"):
            if key in want:
                assert abs(got[key] - want[key]) < 1e-6, (got, want)


def train_until_third_save(args, out, monkeypatch, partial_write=False):
    """Run train_main(args) into `out` and die (KeyboardInterrupt) at its third torch.save,
    after writing half a file there when partial_write."""
    import minimind.checkpoint as checkpoint
    real_save, calls = torch.save, {"n": 0}

    def dying_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            if partial_write:
                Path(path).write_bytes(b"\x80\x02partial")
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_main(args + ["--output_dir", str(out)])
    monkeypatch.setattr(checkpoint.torch, "save", real_save)


def test_crash_during_checkpoint_write_keeps_previous(conversations, tmp_path, monkeypatch):
    reference = run_uninterrupted(conversations, tmp_path / "ref", RESUME_EXTRA)
    out = tmp_path / "crash"
    # the third checkpoint: write half a file, then die
    train_until_third_save(TINY + ["--data", str(conversations)] + RESUME_EXTRA, out, monkeypatch, partial_write=True)
    survivor = torch.load(out / "checkpoint.pt", weights_only=True)
    assert survivor["progress"]["global_step"] == 4  # the second checkpoint, intact
    assert train_main(TINY + ["--data", str(conversations), "--output_dir", str(out), "--resume"] + RESUME_EXTRA) == 0
    assert_same_weights(torch.load(out / "model_final.pth", weights_only=True), reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "term"
    command = [sys.executable, str(ROOT / "train.py")] + TINY + ["--data", str(corpus), "--output_dir", str(out),
                                                                 "--epochs", "50", "--save_steps", "0", "--log_interval", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    for line in process.stdout:
        output.append(line)
        if "Step [2/" in line:
            process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    text = "".join(output)
    assert process.returncode == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and "--resume" in text
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["global_step"] >= 2


def test_nan_loss_stops_with_a_clear_message(corpus, tmp_path, capsys, monkeypatch):
    """A loss that becomes NaN (here at the third step) stops the run; the last checkpoint stays good."""
    import dataclasses
    import minimind.stages as stages
    calls = []

    def loss_that_overflows(model, batch, normalizer, helpers):
        loss, metrics = stages.language_model_loss(model, batch, normalizer, helpers)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    monkeypatch.setitem(stages.STAGES, "pretrain", dataclasses.replace(stages.STAGES["pretrain"], loss=loss_that_overflows))
    out = tmp_path / "nan"
    code = cli_main(["train"] + TINY + ["--data", str(corpus), "--output_dir", str(out), "--val_fraction", "0",
                                        "--epochs", "3", "--save_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged at step 3" in err and "Lower --learning_rate" in err
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
