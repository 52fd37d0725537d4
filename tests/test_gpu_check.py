"""bench/gpu_check.py, the check that runs on a GPU window, kept working on the CPU: its --tiny mode
runs every part end to end, and its report says what passed, what was measured and what needs CUDA."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
STATUSES = ("pass", "fail", "measured", "skipped: ", "error: ", "timeout")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_check")
    environment = {**os.environ, "MINIMIND_CACHE": str(folder / "cache")}
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--output_dir", str(folder)],
                            capture_output=True, text=True, env=environment, timeout=600, cwd=ROOT)
    return result, folder


@pytest.mark.long  # bench/gpu_check.py --device cpu --tiny: 40 s
def test_the_cpu_mode_runs_every_part_and_passes_what_a_cpu_can_check(tiny_report):
    result, folder = tiny_report
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((folder / "report.json").read_text())
    assert list(report["parts"]) == ["correctness", "speed", "memory", "stages", "inference", "distributed"]
    rows = report["rows"]
    assert all(row["status"].startswith(STATUSES) for row in rows), [row["status"] for row in rows]
    by_part = {part: [row for row in rows if row["part"] == part] for part in report["parts"]}
    assert all(by_part.values()), "every part reports at least one row"
    # correctness: everything a CPU can check passes; the rest says it needs CUDA
    correctness = by_part["correctness"]
    assert {row["status"] for row in correctness} <= {"pass", "skipped: needs CUDA"}
    checks = " ".join(row["check"] for row in correctness if row["status"] == "pass")
    for needed in ("MiniMind2 dense", "MiniMind-3 MoE", "KV-cache decode", "left-padded batch", "bfloat16 vs float32",
                   "exact resume"):
        assert needed in checks
    resume = next(row for row in correctness if row["check"].startswith("exact resume"))
    assert resume["value"] == "identical weights"
    # the stages each ran their steps; CUDA-only things are said to be skipped, not silently absent
    assert [row["status"] for row in by_part["stages"]] == ["pass"] * 5
    assert all(row["status"] == "skipped: needs CUDA" for row in by_part["distributed"])
    speed = [row for row in by_part["speed"] if row["check"].startswith("hidden") and "train.py" in row["check"]]
    assert [row["status"] for row in speed] == ["measured"] * 2 + ["skipped: --tiny (compiling takes longer than "
                                                                    "the CPU mode's minute)"] * 2
    assert all(row["numbers"]["tokens_per_s"] > 0 for row in speed if row["status"] == "measured")
    memory = next(row for row in by_part["memory"] if "forecast" in row["check"])
    assert memory["status"] == "pass", memory
    serve = [row for row in by_part["inference"] if row["check"].startswith("minimind serve")]
    assert [row["numbers"]["errors"] for row in serve] == [0, 0]
    # the Markdown table holds the same rows; the runs' folders are removed, their logs kept
    markdown = (folder / "report.md").read_text()
    assert markdown.count("\n| ") == 2 + len(report["parts"]) + 2 + len(rows)
    assert not (folder / "runs").exists() and (folder / "logs" / "curve_float32.log").exists()


def test_peak_table_tells_chips_apart_and_says_unknown():
    check = load_script()
    assert check.peak_tflops("NVIDIA H200", "bfloat16") == 989
    assert check.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756
    assert check.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312
    assert check.peak_tflops("NVIDIA A10", "bfloat16") == 125
    assert check.peak_tflops("Tesla T4", "bfloat16") is None and check.peak_tflops("Tesla T4", "float16") == 65
    assert check.peak_tflops("Some Future GPU", "bfloat16") is None


def test_a_part_that_fails_or_overruns_is_reported_and_the_next_one_runs(tmp_path, monkeypatch):
    check = load_script()

    def crashes(context):
        raise RuntimeError("a broken path")

    def overruns(context):
        context.row("slow", "first row", "measured", "1")
        time.sleep(30)

    def runs(context):
        context.row("last", "still runs", "pass")

    monkeypatch.setattr(check, "PARTS", {"broken": (crashes, 5, 5), "slow": (overruns, 0.5, 0.5),
                                         "last": (runs, 5, 5)})
    code = check.main(["--device", "cpu", "--tiny", "--output_dir", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "broken": "error", "slow": "timeout", "last": "pass"}
    rows = [(row["part"], row["status"]) for row in report["rows"]]
    assert rows == [("broken", "error: RuntimeError"), ("slow", "measured"), ("slow", "timeout"), ("last", "pass")]
    assert "a broken path" in report["rows"][0]["detail"]
