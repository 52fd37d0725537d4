#!/bin/sh
# The whole path on a CPU in one command: pretraining, SFT, eval, DPO, GRPO, export, report.md.
#   recipes/cpu_session.sh [DATA_DIR] [RUN_DIR]        (defaults: data/ and output/cpu_session/)
# Settings: recipes/cpu/*.yaml (docs/training_guide.md, "The CPU session"). Run it again to resume.
here=$(dirname "$0")
exec python "$here/session.py" --settings "$here/cpu" --data_dir "${1:-data}" --run_dir "${2:-output/cpu_session}"
