"""Training: the run's typed settings (config.py), the stage table (stages.py) with each stage's
loss (dpo.py, grpo.py, distill.py, rewards.py), the trainer and its loop (trainer.py), checkpoints
(checkpoint.py), several processes (distributed.py), the forecast (estimate.py, dry_run.py) and
the run's log (run_log.py)."""
