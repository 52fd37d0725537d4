"""Files the project writes follow the user's umask, as any other program's do (minimind/files.py):
nothing private that the user's group should read, whichever library wrote it."""
import os
import stat
from pathlib import Path

from minimind.commands.main import main as cli_main

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = ["--hidden_size", "32", "--num_layers", "2", "--num_heads", "4", "--num_key_value_heads", "2",
        "--max_seq_len", "64", "--max_steps", "2", "--eval_max_tokens", "512", "--sample_tokens", "0",
        "--report_to", "none", "--device", "cpu"]


def test_every_writer_follows_the_umask(tmp_path, monkeypatch):
    """Training (checkpoint, models, logs, plot, LoRA adapter), merge, export (llama in bfloat16 with its
    card, gguf), tokenizer training and eval's report, under umask 027: files 0640, folders 0750
    (safetensors and mkstemp alone would make some files 0600)."""
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "outputs"
    commands = [
        ["train", *TINY, "--output_dir", str(out / "base")],
        ["train", *TINY, "--data", str(DATA / "sft_train.jsonl"), "--pretrained_path", str(out / "base" / "final"),
         "--lora_rank", "4", "--output_dir", str(out / "lora")],
        ["merge", "--model", str(out / "base" / "final"), "--adapter", str(out / "lora" / "adapter"), "--output_dir",
         str(out / "merged"), "--save_pth"],
        ["export", "--model", str(out / "merged"), "--to", "llama", "--dtype", "bfloat16", "--output_dir",
         str(out / "export" / "llama")],
        ["export", "--model", str(out / "merged"), "--to", "gguf", "--output_dir", str(out / "export" / "gguf")],
        ["tokenizer", "train", "--data", str(DATA / "sft_eval.jsonl"), "--vocab_size", "300", "--output_dir",
         str(out / "tokenizer")],
        ["eval", "--model", str(out / "merged"), "--data", str(DATA / "sft_eval.jsonl"), "--max_samples", "2"],
    ]
    previous = os.umask(0o027)
    try:
        for command in commands:
            assert cli_main(command) == 0, command
    finally:
        os.umask(previous)
    written = list(out.rglob("*"))
    names = {path.relative_to(out).as_posix() for path in written}
    assert {"lora/adapter/adapter_model.safetensors", "export/llama/model.safetensors", "export/llama/README.md",
            "merged/model.pth", "base/checkpoint.pt", "export/gguf/model-f32.gguf", "tokenizer/tokenizer.json",
            "merged/eval_report.json", "base/loss.png"} <= names
    wrong = {path.relative_to(out).as_posix(): oct(stat.S_IMODE(path.stat().st_mode)) for path in written
             if stat.S_IMODE(path.stat().st_mode) != (0o750 if path.is_dir() else 0o640)}
    assert not wrong, wrong
