"""What a training run leaves in its --output_dir, and the rule that keeps a new run from replacing
an earlier one without a word.

    output/checkpoint.pt        everything --resume needs
    output/metrics.jsonl        one row per log step and validation; loss.png draws it
    output/run_config.yaml      every flag: `python train.py --config output/run_config.yaml` repeats the run
    output/model_epoch_N.pth    float16 snapshots; model_final.pth + config.json, final/ (Hugging Face style)
    output/adapter/             LoRA's adapters; tensorboard/ its event files

A folder that holds any of these holds a run: training into it again needs --resume (continue it)
or --overwrite (delete it and start over). Checked from file names alone, so the commands check it
before torch loads, and every rank of a torchrun job sees the same folder (none writes before all
have joined).
"""
import shutil
from pathlib import Path

from ..errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
RUN_CONFIG_NAME = "run_config.yaml"
# model_final.pth's config.json is deleted with an earlier run but does not mark one: other files
# of that name are common.
RUN_FILES = (CHECKPOINT_NAME, "final", "model_final.pth", "adapter", METRICS_NAME, "model_epoch_*.pth", RUN_CONFIG_NAME,
             "loss.png", "tensorboard")
MODELS = ("final", "model_final.pth", "adapter", "model_epoch_*.pth")  # what a finished run is for


def earlier_run(output_dir, names=RUN_FILES):
    """The names of an earlier run's files in `output_dir` (folders with a trailing /), in RUN_FILES order."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path for pattern in names for path in sorted(folder.glob(pattern))]
    return [path.name + ("/" if path.is_dir() else "") for path in found]


def check_output_dir(run):
    """Refuse (UserError) a run that would replace an earlier one in run.output_dir (a RunSettings):
    without --resume or --overwrite when the folder holds a run, and under --resume when it holds a
    run's models but no checkpoint to continue from. --resume on a folder without a run starts
    afresh (the same command serves the first start and every restart); --dry_run writes nothing."""
    if run.dry_run:
        return
    if run.resume and run.overwrite:
        raise UserError("--resume continues the run in --output_dir and --overwrite deletes it: give one of them")
    folder = Path(run.output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {folder} is a file; give a folder")
    if run.overwrite or run.resume and (folder / CHECKPOINT_NAME).exists():
        return
    found = earlier_run(folder, MODELS if run.resume else RUN_FILES)
    if not found:
        return
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    if run.resume:
        raise UserError(f"--resume: {folder} holds a run ({shown}) but no {CHECKPOINT_NAME} to continue from; "
                        f"add --overwrite to delete it and start over, or choose another --output_dir")
    raise UserError(f"{folder} holds an earlier run ({shown}): add --resume to continue it, --overwrite to delete "
                    f"it and start over, or choose another --output_dir")


def remove_earlier_run(output_dir):
    """--overwrite: delete an earlier run's files (RUN_FILES and model_final.pth's config.json) and
    nothing else; returns what was deleted."""
    folder = Path(output_dir)
    found = earlier_run(folder)
    if "model_final.pth" in found or any(name.startswith("model_epoch_") for name in found):
        found += ["config.json"] if (folder / "config.json").is_file() else []
    for name in found:
        path = folder / name.rstrip("/")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found
