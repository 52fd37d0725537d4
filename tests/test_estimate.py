"""The forecast: a dry run writes nothing, counts what the real run then does; the arithmetic."""
import re
from pathlib import Path

import numpy as np
import pytest

from minimind.commands.main import main as cli_main
from minimind.commands.train import parse as parse_train_args
from minimind.training.dry_run import measure, print_report
from minimind.training.estimate import Costs, Workload, duration_text, follow_ups, forecast, size_text
from minimind.training.schedule import Plan

from .conftest import TINY, metrics, pairs_file


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


def dry_then_real(args, out, capsys):
    """Run `args` with --dry_run, then for real; returns (dry run output, real run output)."""
    capsys.readouterr()
    assert cli_main(["train"] + args + ["--dry_run"]) == 0
    dry = capsys.readouterr().out
    assert not Path(out).exists()  # not even created
    assert cli_main(["train"] + args) == 0
    return dry, capsys.readouterr().out


def planned(dry):
    """(optimizer steps, tokens in all) from a dry run's Plan line."""
    found = re.search(r"Plan: .*?, (\d+) optimizer steps .*?, ([\d,]+) tokens in all", dry)
    return int(found.group(1)), int(found.group(2).replace(",", ""))


def trained(real):
    found = re.search(r"Trained ([\d,]+) tokens in (\d+) optimizer steps", real)
    return int(found.group(2)), int(found.group(1).replace(",", ""))


def test_pretraining_dry_run_writes_nothing_and_counts_what_the_run_does(corpus, tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = TINY + ["--data", str(corpus), "--epochs", "2", "--output_dir", str(out), "--log_interval", "1"]
    capsys.readouterr()
    assert cli_main(["train"] + args + ["--dry_run"]) == 0
    dry = capsys.readouterr().out
    assert not out.exists()
    after_dry_run = listing(cache)
    entries = [name for name in after_dry_run if name not in ("files", "locks")]  # beside: digests, locks
    assert len(entries) == 1 and (cache / entries[0] / "summary.json").is_file()  # the run's own entry, complete
    assert cli_main(["train"] + args) == 0
    real = capsys.readouterr().out
    assert listing(cache) == after_dry_run  # the real run read the entry the dry run made, and made none
    assert planned(dry) == trained(real)
    assert re.search(r"Estimate: about [\d a-z]+, [\d.]+ [kMG]B \(this dry run took", dry)
    # the real run: the same forecast from its first steps, and the time left on every log line
    assert re.search(r"Estimate: about [\d a-z]+, [\d.]+ [kMG]B \(from the first 3 steps\)", real)
    log_lines = [line for line in real.splitlines() if line.startswith("Epoch [")]
    assert log_lines and all(re.search(r"Tokens/s: \d+, ETA: [\d a-z]+$", line) for line in log_lines)
    assert [row["tokens"] for row in metrics(out) if "tokens" in row][-1] == trained(real)[1]


def test_sft_dry_run_counts_padding_partial_epochs_and_follow_ups(conversations, tmp_path, capsys):
    """--max_steps ending inside an epoch, accumulation, a validation set, epoch files every 2 epochs."""
    out = tmp_path / "sft"
    args = TINY + ["--data", str(conversations), "--output_dir", str(out), "--max_steps", "12", "--batch_size", "3",
                   "--accumulation_steps", "2", "--save_interval", "2", "--save_steps", "5", "--eval_interval", "4",
                   "--val_fraction", "0.1", "--max_seq_len", "128"]
    report = measure(parse_train_args(args + ["--dry_run"]))
    assert not out.exists()
    workload = report.workload
    assert workload.total_steps == 12 and workload.steps_per_epoch == 6 and workload.epochs == 2
    assert 0 < workload.padding_fraction < 1
    capsys.readouterr()
    print_report(report)
    dry = capsys.readouterr().out
    assert re.search(r"Padding: \d+\.\d% of the positions", dry)
    assert cli_main(["train"] + args) == 0
    assert planned(dry) == trained(capsys.readouterr().out) == (12, int(workload.tokens.sum()))
    rows = metrics(out)
    validations = [row for row in rows if "val_loss" in row]
    assert len(validations) == workload.initial_validation + workload.validations.sum()
    assert sorted(p.name for p in out.glob("model_epoch_*.pth")) == ["model_epoch_2.pth"]
    assert workload.epoch_files.sum() == 1 and workload.checkpoints.sum() == 2 + 2  # steps 5 and 10, 2 epoch ends
    assert len(rows) == workload.log_rows


def test_dpo_dry_run_counts_both_responses(tmp_path, capsys):
    out = tmp_path / "dpo"
    args = TINY + ["--data", str(pairs_file(tmp_path)), "--output_dir", str(out), "--epochs", "1",
                   "--max_seq_len", "48", "--sample_tokens", "0"]
    dry, real = dry_then_real(args, out, capsys)
    steps, tokens = planned(dry)
    assert (steps, tokens) == trained(real)
    assert steps == 6  # 23 pairs after the held-out one, 4 a batch


def test_dry_run_needs_no_writable_output_parent(corpus, tmp_path, capsys):
    """The output folder's parent may not exist yet: the dry run creates neither."""
    out = tmp_path / "not" / "yet" / "there"
    assert cli_main(["train"] + TINY + ["--data", str(corpus), "--max_steps", "2", "--output_dir", str(out),
                                        "--dry_run"]) == 0
    assert not (tmp_path / "not").exists()
    assert "Disk:" in capsys.readouterr().out


def test_follow_ups_match_the_trainers_schedule():
    """Validations every 3 steps (not at the last), checkpoints every 4 and at epoch ends, epoch
    files for complete epochs only."""
    from minimind.training.config import OptimSettings, RunSettings
    plan = Plan.make(10, OptimSettings(batch_size=2, epochs=3, max_steps=12))  # 5 steps an epoch: 5, 5, 2
    validations, checkpoints, epoch_files = follow_ups(plan, RunSettings(eval_interval=3, save_steps=4), True)
    assert np.flatnonzero(validations).tolist() == [2, 4, 5, 8, 9, 11]  # steps 3, 5 (end), 6, 9, 10 (end), 12 (end)
    assert validations[4] == 1 and validations[11] == 1  # step 12 = the last: only its epoch end's
    assert checkpoints.tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 2]
    assert np.flatnonzero(epoch_files).tolist() == [4, 9]  # the third epoch stops after 2 of its 5 steps


def test_forecast_adds_the_parts():
    workload = Workload(padded=np.array([100, 100, 50]), tokens=np.array([90, 80, 50]),
                        validations=np.array([0, 1, 1]), checkpoints=np.array([1, 0, 1]),
                        epoch_files=np.array([0, 1, 1]), steps_per_epoch=2, epochs=2, tokens_per_epoch=170,
                        validation_padded=60, initial_validation=True, log_rows=5)
    costs = Costs(startup=5.0, per_padded=0.01, first_step_extra=0.5, validation=2.0, checkpoint=3.0,
                  epoch_file=1.0, finish=4.0)
    result = forecast(workload, costs)
    assert result.steps == pytest.approx(2.5 + 0.5)
    assert result.validations == pytest.approx(3 * 2.0)
    assert result.total == pytest.approx(5 + 3 + 6 + 2 * 3.0 + 2 * 1.0 + 4)
    assert result.first_epoch == pytest.approx(2.0 + 2.0 + 3.0 + 1.0)
    assert workload.padding_fraction == pytest.approx(1 - 220 / 250)
    rest = forecast(workload, costs, from_step=2, startup=0.0)  # one step left: no first-step extra, no start
    assert rest.total == pytest.approx(0.5 + 2.0 + 3.0 + 1.0 + 4.0)
    costs.validation = None  # not measured yet: a forward pass, a third of a step, over the validation set
    assert forecast(workload, costs).validations == pytest.approx(3 * 0.01 * 60 / 3)


def test_durations_and_sizes_read_like_the_issue():
    assert [duration_text(s) for s in (0.4, 42, 340, 3600 * 2 + 299)] == ["0 s", "42 s", "5 min 40 s", "2 h 05 min"]
    assert [size_text(s) for s in (512, 34_000, 310e6, 2.04e9, 75e9)] == ["512 B", "34 kB", "310 MB", "2.0 GB", "75 GB"]


def test_resumed_dry_run_forecasts_the_steps_left_and_leaves_the_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--output_dir", str(out), "--sample_tokens", "0"]
    assert cli_main(["train"] + args + ["--max_steps", "4"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli_main(["train"] + args + ["--max_steps", "10", "--resume", "--dry_run"]) == 0
    assert "Resuming: 4 of the 10 steps are done" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_every_measured_step_trains_as_the_real_run_does(corpus, tmp_path, capsys, monkeypatch):
    """The what-ifs come after the end of the run, whose sample generation leaves the model in eval
    mode: they are measured in training mode again (gradient checkpointing recomputes only there).
    Without validation nothing is logged, and the end of the run still plots nothing and goes on."""
    import minimind.training.dry_run as dry_run
    modes = []

    def recording(trainer, group):
        modes.append(trainer.model.training)
        return real_time_step(trainer, group)

    real_time_step = dry_run.time_step
    monkeypatch.setattr(dry_run, "time_step", recording)
    args = TINY + ["--data", str(corpus), "--val_fraction", "0", "--output_dir", str(tmp_path / "run")]
    assert cli_main(["train"] + args + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "--gradient_checkpointing: " in out and "--batch_size 8: " in out  # both what-ifs were measured
    assert len(modes) >= 8 and all(modes)


def test_largest_batch_is_the_last_that_fits_the_gpu_memory_model():
    """A step's tensors: 1000 MiB at batch 4, 1800 at batch 8 (200 a sample over 200 fixed); the
    allocator reserves 10% over them and the context takes 500 MiB of a 10000 MiB GPU, 5% of which
    stays free: 39 samples fit (9300 MiB), 40 would not (9520)."""
    from minimind.devices import GpuMemory
    from minimind.training.dry_run import largest_batch
    gpu = GpuMemory(tensors=1000, reserved=1100, overhead=500, capacity=10000)
    measured_twice = largest_batch(4, 1000, 1800, None, gpu)
    assert measured_twice.batch_size == 39
    assert measured_twice.peak_mib() == pytest.approx(9300) and measured_twice.peak_mib(40) == pytest.approx(9520)
    # measured once: the weights, gradients and optimizer state are the other point
    assert largest_batch(4, 1000, None, 200, gpu).batch_size == 39
    assert largest_batch(4, 1000, 1000, None, gpu) is None  # no growth with the batch: nothing to tell
    assert largest_batch(1, 9500, None, 200, gpu) is None   # not even one sample fits
