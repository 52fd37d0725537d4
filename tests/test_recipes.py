"""recipes/session.py: the whole path in one command, with tiny settings so that it runs in about a minute."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "session_tiny"
STEPS = ["pretrain", "eval_pretrain_sft_eval", "sft", "eval_sft_sft_eval", "eval_sft_grpo_eval_system",
         "eval_sft_dpo_eval", "dpo", "eval_dpo_sft_eval", "eval_dpo_dpo_eval", "grpo", "eval_grpo_sft_eval",
         "eval_grpo_grpo_eval_system", "export"]


def run_session(run_dir, tmp_path):
    env = {**os.environ, "MINIMIND_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "session.py"), "--settings", str(TINY),
                           "--data_dir", str(ROOT / "data"), "--run_dir", str(run_dir), "--eval_max_samples", "24"],
                          capture_output=True, text=True, env=env, timeout=900)


def test_the_session_runs_every_step_writes_the_report_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    result = run_session(run_dir, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (run_dir / "report.md").read_text()

    # Each step: its command (as a user would type it), wall time and peak memory.
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "`" in line]
    assert [row[0].removeprefix("| ") for row in rows] == STEPS
    for row in rows:
        assert re.fullmatch(r"\d+ s|\d+ min \d+ s", row[1]) and re.fullmatch(r"\d+ MiB", row[2])
        assert row[4].startswith(("`python train.py --config", "`minimind eval", "`minimind export"))
    assert (run_dir / "export" / "model-f32.gguf").exists()

    # Held-out exact match by skill after each stage, from the eval reports.
    table = report.split("## Held-out exact match by skill")[1].split("##")[0]
    header = next(line for line in table.splitlines() if line.startswith("| skill"))
    assert header.count("|") == 8   # skill + six columns: pretraining, SFT (+ system prompt), DPO, GRPO (+ system)
    sft_report = json.loads((run_dir / "eval" / "sft.sft_eval.json").read_text())
    for skill, group in sft_report["by_skill"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {skill} |"))
        assert f"({group['correct']}/{group['total']})" in row.split(" | ")[2]
    assert sum(group["total"] for group in sft_report["by_skill"].values()) == 24
    # ... and split by where the fact is known from: only the pretraining prose, or SFT (new wording).
    known = [json.loads(line)["known_from"] for line in (ROOT / "data" / "sft_eval.jsonl").read_text().splitlines()]
    for label, title in (("pretraining", "facts only the pretraining prose states"), ("sft", "SFT items, new wording")):
        matches = [detail["match"] for detail, from_ in zip(sft_report["details"], known) if from_ == label]
        row = next(line for line in table.splitlines() if line.startswith(f"| {title} |"))
        assert f"({sum(matches)}/{len(matches)})" in row.split(" | ")[2] and matches

    # Loss curves (the PNGs each training step wrote) and three sample answers per stage.
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        assert f"![{stage}]({stage}/loss.png)" in report and (run_dir / stage / "loss.png").exists()
        samples = report.split(f"After {stage}:\n")[1].split("\n\n")[0].splitlines()
        assert len(samples) == 3 and all(line.startswith("- `") and " → `" in line for line in samples)
    assert "## DPO, on the held-out pairs" in report

    # Resumable: finished steps are skipped; a step whose record is gone runs again (training with
    # --resume continues from its checkpoint), and the steps after it run as they had not yet.
    for name in ("grpo", "eval_grpo_sft_eval", "eval_grpo_grpo_eval_system", "export"):
        (run_dir / "steps" / f"{name}.json").unlink()
    result = run_session(run_dir, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skipped = re.findall(r"=== (\w+): done in an earlier run, skipped", result.stdout)
    ran = re.findall(r"=== (\w+): (?:python|minimind)", result.stdout)
    assert skipped == STEPS[:9] and ran == STEPS[9:]
    assert (run_dir / "report.md").read_text().count("| pretrain |") == 1


def test_a_failing_step_stops_the_session_with_its_log_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_train", "sft_eval", "grpo_eval_system", "dpo_train", "dpo_eval", "grpo_train", "grpo_eval"):
        (data / f"{name}.jsonl").write_bytes((ROOT / "data" / f"{name}.jsonl").read_bytes())
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "session.py"), "--data_dir", str(data),
                             "--run_dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.startswith(f"error: not found: {data / 'pretrain.jsonl'}.")

    (data / "pretrain.jsonl").write_text('{"text": "fine"}\n{not json\n')
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "session.py"), "--settings", str(TINY),
                             "--data_dir", str(data), "--run_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env={**os.environ, "MINIMIND_CACHE": str(tmp_path / "c")})
    assert result.returncode == 2
    assert "pretrain.jsonl:2: invalid JSON" in result.stdout
    assert "step pretrain failed with exit code 2" in result.stderr and "logs/pretrain.log" in result.stderr
    assert not (tmp_path / "run" / "steps" / "pretrain.json").exists()
