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
from minimind.commands.main import main as cli_main
from minimind.commands.train import main as train_main
from minimind.commands.train import parse as parse_train_args
from minimind.commands.train import parser as build_parser
from minimind.data.batching import collate
from minimind.data.datasets import SFTDataset
from minimind.data.tokenizer import load_tokenizer
from minimind.training.stages.stage import count_labelled_tokens, language_model_loss

from .conftest import MINIMIND3_CHECKPOINTS, TINY, assert_same_weights, metrics, train_until_third_save

ROOT = Path(__file__).resolve().parents[1]
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
    assert model.config.max_seq_len == 32  # the context it learned, what `serve` and `chat` default to


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
    assert train_main(args + ["--num_layers", "3", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit" in err and len(err.splitlines()) == 1
    assert (out / "final" / "model.safetensors").exists()  # a refused --overwrite leaves the earlier run alone


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


RESUME_EXTRA = ["--epochs", "2", "--save_steps", "2", "--log_interval", "1", "--learning_rate", "2e-3", "--dropout", "0.1"]


@pytest.mark.long
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


def test_crash_during_checkpoint_write_keeps_previous(conversations, tmp_path, monkeypatch):
    reference = run_uninterrupted(conversations, tmp_path / "ref", RESUME_EXTRA)
    out = tmp_path / "crash"
    # the third checkpoint: write half a file, then die
    train_until_third_save(TINY + ["--data", str(conversations)] + RESUME_EXTRA, out, monkeypatch, partial_write=True)
    survivor = torch.load(out / "checkpoint.pt", weights_only=True)
    assert survivor["progress"]["global_step"] == 4  # the second checkpoint, intact
    assert train_main(TINY + ["--data", str(conversations), "--output_dir", str(out), "--resume"] + RESUME_EXTRA) == 0
    assert_same_weights(torch.load(out / "model_final.pth", weights_only=True), reference)


@pytest.mark.long
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


def test_a_folder_that_holds_a_run_needs_resume_or_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--max_steps", "2", "--output_dir", str(out), "--sample_tokens", "0"]
    assert train_main(args + ["--resume"]) == 0  # --resume where there is no run yet starts one
    checkpoint = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert train_main(args + ["--learning_rate", "1e-3"]) == 2
    assert capsys.readouterr().err == (f"error: {out} holds an earlier run (checkpoint.pt, final/, model_final.pth, "
                                       f"metrics.jsonl, ...): add --resume to continue it, --overwrite to delete it "
                                       f"and start over, or choose another --output_dir\n")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert train_main(args + ["--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    # --overwrite deletes the earlier run's files (here one an earlier, longer run left), not the user's
    (out / "model_epoch_7.pth").write_bytes(b"an earlier run's")
    (out / "notes.txt").write_text("mine")
    assert train_main(args + ["--overwrite", "--max_steps", "3"]) == 0
    assert "--overwrite: deleted the earlier run in" in capsys.readouterr().out
    assert not (out / "model_epoch_7.pth").exists() and (out / "notes.txt").read_text() == "mine"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["global_step"] == 3
    assert [row["step"] for row in metrics(out) if "val_loss" in row] == [0, 3]  # this run's log alone
    assert train_main(args + ["--resume", "--max_steps", "4"]) == 0
    assert "Resuming from" in capsys.readouterr().out
    # a finished run without its checkpoint: --resume would start over on top of its models, so it is refused
    (out / "checkpoint.pt").unlink()
    assert train_main(args + ["--resume"]) == 2
    assert "holds a run (final/, model_final.pth) but no checkpoint.pt to continue from" in capsys.readouterr().err


def interrupt_at_step(monkeypatch, step, times):
    """Send this process `times` SIGINTs (Ctrl-C) from inside the loss of optimizer step `step`."""
    import dataclasses

    import minimind.training.stages as stages
    calls = []

    def interrupted_loss(model, batch, normalizer, helpers):
        calls.append(1)
        for _ in range(times if len(calls) == step else 0):
            os.kill(os.getpid(), signal.SIGINT)
        return language_model_loss(model, batch, normalizer, helpers)

    interrupted = dataclasses.replace(stages.STAGES["pretrain"], loss=interrupted_loss)
    monkeypatch.setitem(stages.STAGES, "pretrain", interrupted)


def test_a_second_ctrl_c_during_a_step_stops_at_once_and_keeps_the_last_checkpoint(corpus, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--output_dir", str(out), "--val_fraction", "0", "--max_steps", "8",
                   "--save_steps", "2"]
    interrupt_at_step(monkeypatch, step=5, times=2)  # checkpoints were saved at steps 2 and 4
    assert train_main(args) == 128 + signal.SIGINT
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    stopped = [line for line in text.out.splitlines() if line.startswith("Stopped")]
    assert stopped == [f"Stopped at once by a second SIGINT, without saving: {out / 'checkpoint.pt'} holds step 4; "
                       f"continue from there with the same command plus --resume"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["global_step"] == 4
    assert not list(out.glob(".checkpoint.pt.*"))  # no temporary file left behind
    monkeypatch.undo()
    assert train_main(args + ["--resume"]) == 0
    assert "Resuming from" in capsys.readouterr().out


def test_ctrl_c_while_the_final_model_is_written_says_the_training_is_done(corpus, tmp_path, capsys, monkeypatch):
    import minimind.training.trainer as trainer
    out = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--output_dir", str(out), "--val_fraction", "0", "--max_steps", "4"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_model_directory", interrupted)
    assert train_main(args) == 130
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    assert (f"Interrupted while writing the final model; training is complete and {out / 'checkpoint.pt'} holds "
            f"step 4; continue from there with the same command plus --resume, which only writes the final files."
            in text.out)
    monkeypatch.undo()
    assert train_main(args + ["--resume"]) == 0
    assert (out / "final" / "config.json").exists()
    assert "optimizer steps" in capsys.readouterr().out


def test_a_second_ctrl_c_while_the_checkpoint_is_saved_lets_it_finish(corpus, tmp_path, capsys, monkeypatch):
    import minimind.training.trainer as trainer
    out = tmp_path / "run"
    interrupt_at_step(monkeypatch, step=3, times=1)
    real_save = trainer.save_training_state

    def save_interrupted(path, state):  # the second Ctrl-C arrives while the checkpoint is written
        os.kill(os.getpid(), signal.SIGINT)
        real_save(path, state)

    monkeypatch.setattr(trainer, "save_training_state", save_interrupted)
    code = train_main(TINY + ["--data", str(corpus), "--output_dir", str(out), "--val_fraction", "0",
                              "--max_steps", "8", "--save_steps", "0"])
    text = capsys.readouterr()
    assert code == 130 and "Traceback" not in text.out + text.err
    assert "SIGINT again: the checkpoint is being written; finishing it first..." in text.out
    assert f"Stopped by SIGINT. Checkpoint saved to {out / 'checkpoint.pt'} (step 3); continue with the same " \
           f"command plus --resume." in text.out
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["global_step"] == 3  # no step lost


def test_nan_loss_stops_with_a_clear_message(corpus, tmp_path, capsys, monkeypatch):
    """A loss that becomes NaN (here at the third step) stops the run; the last checkpoint stays good."""
    import dataclasses

    import minimind.training.stages as stages
    calls = []

    def loss_that_overflows(model, batch, normalizer, helpers):
        loss, metrics = language_model_loss(model, batch, normalizer, helpers)
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


def output_lines(capsys):
    return capsys.readouterr().out.splitlines()


def test_max_steps_is_the_total_over_as_many_epochs_as_it_takes(conversations, tmp_path, capsys):
    out = tmp_path / "run"
    # 38 training conversations at batch 4: 10 steps an epoch, so 25 steps take three epochs
    assert train_main(TINY + ["--data", str(conversations), "--max_steps", "25", "--epochs", "1",
                              "--output_dir", str(out), "--log_interval", "5"]) == 0
    lines = output_lines(capsys)
    assert "Training for 3 epochs (25 optimizer steps)..." in lines
    steps = [line.split(", Loss")[0] for line in lines if line.startswith("Epoch [")]
    assert steps == ["Epoch [1/3], Step [5/10]", "Epoch [1/3], Step [10/10]", "Epoch [2/3], Step [5/10]",
                     "Epoch [2/3], Step [10/10]", "Epoch [3/3], Step [5/5]"]
    assert max(r["step"] for r in metrics(out)) == 25


def test_resume_without_a_checkpoint_starts_from_the_beginning(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(TINY + ["--data", str(corpus), "--max_steps", "2", "--output_dir", str(out), "--resume"]) == 0
    assert f"--resume: no checkpoint.pt in {out} yet; starting from the beginning." in output_lines(capsys)
    assert (out / "model_final.pth").exists()


def test_resume_that_would_train_something_else_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--max_steps", "2", "--output_dir", str(out), "--save_steps", "1"]
    assert train_main(args) == 0
    capsys.readouterr()
    assert train_main(args + ["--resume", "--batch_size", "2", "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seed 42 -> 7" in err and "global batch" in err and "4 (4 x 1 x 1) -> 2" in err
    # more steps, a new learning rate, other logging: the same run, continued
    assert train_main(args + ["--resume", "--max_steps", "4", "--learning_rate", "5e-5", "--log_interval", "1"]) == 0
    assert max(r["step"] for r in metrics(out)) == 4
    # changed data content under the same name is refused too
    corpus.write_text(corpus.read_text() + "\nOne more document at the end.\n")
    assert train_main(args + ["--resume", "--max_steps", "6"]) == 2
    assert "the data files' contents differ" in capsys.readouterr().err


def test_skip_bad_records_in_pretraining_reports_them_and_is_remembered(tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    good = [json.dumps({"text": f"The river number {n} runs past the town, {n * 3} kilometres long."}) for n in range(40)]
    path.write_text("\n".join(good[:2] + ['{"text": "unterminated'] + good[2:] + ['{"txt": "typo"}']) + "\n")
    args = TINY + ["--data", str(path), "--max_steps", "1", "--sample_tokens", "0"]
    assert train_main(args + ["--output_dir", str(tmp_path / "a")]) == 2
    assert f"{path}:3: invalid JSON" in capsys.readouterr().err
    for run in ("b", "c"):  # the second run reads the token cache, and still reports what was skipped
        assert train_main(args + ["--output_dir", str(tmp_path / run), "--skip_bad_records"]) == 0
        lines = output_lines(capsys)
        assert len([line for line in lines if f"{path}: 42 records read, 2 skipped" in line]) == 1  # the summary
        report = [line for line in lines if "bad records" in line]
        assert len(report) == 1 and "skipped 2 bad records" in report[0] and f"{path}:3: invalid JSON" in report[0]
        assert f"{path}:42:" in report[0]
    assert train_main(args + ["--output_dir", str(tmp_path / "d")]) == 2  # without the flag: refused again
    assert f"{path}:3: invalid JSON" in capsys.readouterr().err


def test_validation_is_capped_to_a_fixed_sample(conversations, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(TINY + ["--data", str(conversations), "--eval_data", str(conversations), "--max_steps", "2",
                              "--eval_max_tokens", "200", "--output_dir", str(out)]) == 0
    line = next(line for line in output_lines(capsys) if line.startswith("Validation uses"))
    used = int(line.split()[2])
    assert 1 <= used < 40 and "of 40 samples (--eval_max_tokens 200)" in line
    assert len([r for r in metrics(out) if "val_loss" in r]) == 2


def test_flag_names_are_the_same_in_every_verb(capsys):
    from minimind.commands import main as cli
    helps = {}
    for verb, extra in (("generate", []), ("chat", []), ("eval", []), ("merge", []), ("tokenizer", ["train"]),
                        ("train", [])):
        with pytest.raises(SystemExit):
            cli.main([verb, *extra, "--help"])
        helps[verb] = capsys.readouterr().out
    for verb in ("generate", "chat", "eval", "merge", "train"):
        assert "--model" in helps[verb], verb
    for verb in ("merge", "tokenizer", "train"):
        assert "--output_dir" in helps[verb], verb
    assert "--base" in helps["merge"] and "--out" in helps["merge"] and "--out" in helps["tokenizer"]
    for verb in ("generate", "chat", "eval"):
        assert "--device" in helps[verb] and "--dtype" in helps[verb], verb
    # booleans: the flag alone, or 0/1, the same everywhere
    for spelling, expected in ((["--use_moe"], True), (["--use_moe", "1"], True), (["--use_moe", "0"], False)):
        assert parse_train_args(spelling).model.use_moe is expected
    assert parse_train_args(["--model", "x"]).model.pretrained_path == "x"
    assert parse_train_args(["--skip_bad_records", "false"]).data.skip_bad_records is False


def test_outputs_are_shareable_small_and_listed_with_their_sizes(corpus, tmp_path, capsys):
    """Files follow the umask (not mkstemp's 0600); epoch files hold float16 weights (the original's
    published format) and --save_total_limit keeps the newest; the run lists what it wrote, with sizes,
    and counts only its own files in the total."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.bin").write_bytes(bytes(3_000_000))  # the user's, not the run's
    previous = os.umask(0o022)
    try:
        assert train_main(TINY + ["--data", str(corpus), "--epochs", "3", "--output_dir", str(out),
                                  "--save_total_limit", "2"]) == 0
    finally:
        os.umask(previous)
    assert sorted(p.name for p in out.glob("model_epoch_*.pth")) == ["model_epoch_2.pth", "model_epoch_3.pth"]
    for name in ("model_epoch_3.pth", "model_final.pth", "checkpoint.pt", "config.json", "metrics.jsonl",
                 "run_config.yaml", "final/model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    epoch = torch.load(out / "model_epoch_3.pth", weights_only=True)
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert {v.dtype for v in epoch.values()} == {torch.float16} and {v.dtype for v in final.values()} == {torch.float32}
    # the tied output layer is stored once
    embedding_bytes = final["model.embed_tokens.weight"].numel() * 4
    total_bytes = sum(v.numel() * 4 for k, v in final.items() if k != "lm_head.weight")
    assert (out / "model_final.pth").stat().st_size < total_bytes + embedding_bytes / 2
    text = capsys.readouterr().out
    summary = text[text.index("Written ("):]
    listed = {Path(name): size for name, size in re.findall(r"^  (\S+) \(([\d.]+ [kMG]?B)\)$", summary, re.M)}
    assert {out / name for name in ("model_final.pth", "config.json", "final", "metrics.jsonl", "run_config.yaml",
                                    "checkpoint.pt", "model_epoch_2.pth", "model_epoch_3.pth")} <= set(listed)
    assert out / "notes.bin" not in listed
    in_bytes = sum(path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*"))
                   for path in listed)
    total = re.match(r"Written \(([\d.]+) MB in .*run\):", summary)
    assert total and abs(float(total.group(1)) * 1e6 - in_bytes) < 0.1e6, (total, in_bytes)
    assert re.search(r"Model saved to: .*model_epoch_3.pth \([\d.]+ kB\)", text)


@pytest.mark.long
def test_final_directory_opens_without_minimind_and_stops_where_generate_stops(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_main(TINY + ["--data", str(corpus), "--max_steps", "2", "--output_dir", str(out)]) == 0
    config = json.loads((out / "final" / "generation_config.json").read_text())
    assert sorted(config["eos_token_id"]) == [0, 2]  # <|endoftext|> and <|im_end|>, as minimind generate stops
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out / 'final')!r}, trust_remote_code=True).eval()
with torch.no_grad():
    print(model(torch.tensor([[1, 5, 9, 200]])).logits[0, -1, :5].tolist())
print(any(name == 'minimind' or name.startswith('minimind.') for name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    *_, logits_line, imported = result.stdout.strip().splitlines()
    assert imported == "False", result.stderr[-2000:]
    with torch.no_grad():
        expected = load_model(out / "final")(torch.tensor([[1, 5, 9, 200]])).logits[0, -1, :5].tolist()
    assert json.loads(logits_line) == pytest.approx(expected, abs=1e-5)


def test_vocabulary_follows_the_tokenizer(corpus, tmp_path, capsys):
    from minimind.data.tokenizer import train_tokenizer
    tokenizer_dir = tmp_path / "tok"
    train_tokenizer([corpus], 300, tokenizer_dir)
    base = TINY + ["--data", str(corpus), "--max_steps", "1", "--tokenizer", str(tokenizer_dir)]
    assert train_main(base + ["--output_dir", str(tmp_path / "a")]) == 0
    assert "Vocabulary: 300 tokens, the tokenizer's (--vocab_size to choose another size)" in capsys.readouterr().out
    assert load_model(tmp_path / "a" / "final").config.vocab_size == 300
    assert train_main(base + ["--output_dir", str(tmp_path / "b"), "--vocab_size", "320"]) == 0
    assert "--vocab_size 320 is larger than the tokenizer's 300 tokens" in capsys.readouterr().out
    assert train_main(base + ["--output_dir", str(tmp_path / "c"), "--vocab_size", "200"]) == 2
    assert "the tokenizer has 300 tokens but the model's vocabulary is 200" in capsys.readouterr().err


@pytest.mark.long
def test_log_lines_do_not_tear_the_progress_bar(corpus, tmp_path):
    """In a terminal the bar redraws on stderr; validation and step lines are written through it."""
    import pty
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py")] + TINY + ["--data", str(corpus), "--epochs", "2",
                                                                 "--log_interval", "1", "--output_dir", str(out)]
    import fcntl
    import struct
    import termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=300)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert process.returncode == 0, screen[-2000:]
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
    lines = [ansi.sub("", line).split("\r")[-1] for line in screen.replace("\r\n", "\n").split("\n")]
    assert any("%|" in part for part in ansi.sub("", screen).split("\r")), "the bar was drawn"
    for prefix in ("Validation at step", "Epoch [", "Model saved to"):
        matching = [line for line in ansi.sub("", screen).replace("\r\n", "\n").split("\n") if prefix in line]
        assert matching and all(line.split("\r")[-1].startswith(prefix) for line in matching), matching
    assert not any("%|" in line and "Validation" in line for line in lines)


def test_a_float32_checkpoint_resumes_in_float16(conversations, tmp_path):
    """--dtype may change on resume: a run without a loss scaler saved an empty scaler state, and
    float16's scaler then starts afresh instead of failing to read it."""
    args = TINY + ["--data", str(conversations), "--sample_tokens", "0", "--log_interval", "1",
                   "--output_dir", str(tmp_path / "run")]
    assert train_main(args + ["--max_steps", "2", "--dtype", "float32"]) == 0
    assert train_main(args + ["--max_steps", "4", "--dtype", "float16", "--resume"]) == 0
    assert [row["step"] for row in metrics(tmp_path / "run") if "loss" in row] == [1, 2, 3, 4]


def pretrain_windows(corpus):
    from minimind.data.datasets import PretrainDataset
    return PretrainDataset([corpus], load_tokenizer(), max_seq_len=32, progress=False)


def text_loss(model_dir, corpus):
    """Mean next-token loss of a trained model on the windows of a pretraining text."""
    model = load_model(model_dir).eval()
    windows = pretrain_windows(corpus)
    batch = collate([windows[i] for i in range(len(windows))])
    with torch.no_grad():
        return model(batch["input_ids"], labels=batch["labels"]).loss.item()


def test_sft_with_replay_keeps_what_pretraining_stored(corpus, conversations, tmp_path, capsys):
    base = tmp_path / "base"
    assert train_main(TINY + ["--data", str(corpus), "--epochs", "8", "--learning_rate", "3e-3",
                              "--output_dir", str(base), "--val_fraction", "0"]) == 0
    sft = TINY + ["--data", str(conversations), "--pretrained_path", str(base / "final"), "--epochs", "4",
                  "--learning_rate", "1e-2", "--val_fraction", "0"]
    capsys.readouterr()
    assert train_main(sft + ["--output_dir", str(tmp_path / "plain")]) == 0
    plain_samples = re.search(r"Data: (\d+) training samples", capsys.readouterr().out).group(1)
    assert train_main(sft + ["--output_dir", str(tmp_path / "replay"), "--replay_data", str(corpus)]) == 0
    out = capsys.readouterr().out
    windows = len(pretrain_windows(corpus))
    assert f"Data: {int(plain_samples) + windows} training samples" in out and "Data: replayed " in out
    before, plain, replay = (text_loss(folder / "final", corpus) for folder in (base, tmp_path / "plain", tmp_path / "replay"))
    # fine-tuning alone at a high rate overwrites the pretrained text; replay keeps it
    assert plain > before + 0.5 and replay < plain - 0.5, (before, plain, replay)
    # and the conversations are still learned: the answers' loss fell in both runs
    assert metrics(tmp_path / "replay")[-1]["loss"] < 2.0


def test_replay_data_must_be_pretraining_text_for_sft(corpus, conversations, tmp_path, capsys):
    args = TINY + ["--max_steps", "1", "--output_dir", str(tmp_path / "run")]
    assert train_main(args + ["--data", str(conversations), "--replay_data", str(conversations)]) == 2
    assert "--replay_data takes pretraining text" in capsys.readouterr().err
    assert train_main(args + ["--data", str(corpus), "--replay_data", str(corpus)]) == 2
    assert "this run's stage is pretrain" in capsys.readouterr().err
    assert train_main(args + ["--data", str(conversations), "--replay_data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
