"""Training: the run's typed settings (config.py), the stages (stages/: one module each, and the
table the rest reads), their algorithms (dpo.py, grpo.py with rewards.py, distill.py), the trainer
and its loop (trainer.py), checkpoints (checkpoint.py), several processes (distributed.py), the
schedule (schedule.py), the forecast (estimate.py, dry_run.py) and the run's log (run_log.py)."""
