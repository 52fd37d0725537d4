#!/bin/sh
# The whole path on a GPU in one command, with larger settings: recipes/gpu/*.yaml.
#   recipes/gpu_session.sh [DATA_DIR] [RUN_DIR]        (defaults: data/ and output/gpu_session/)
here=$(dirname "$0")
exec python "$here/session.py" --settings "$here/gpu" --data_dir "${1:-data}" --run_dir "${2:-output/gpu_session}" \
    --eval_batch_size 128
