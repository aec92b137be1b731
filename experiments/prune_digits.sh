#!/usr/bin/env bash
# Accuracy after recovery on digits, 3 seeds: dense cnn_small vs 50% channels pruned + distilled
# (experiment=prune_channel_digits), and 90% LAMP sparsity + fine-tuning. Prints one line per run.
set -euo pipefail
runs=${1:-experiments/runs}
for seed in 0 1 2; do
  for recipe in "experiment=prune_channel_digits" "prune=lamp prune.sparsity=0.9"; do
    modrun prune --runs-dir "$runs" $recipe seed=$seed trainer.progress=false 2>/dev/null
    run=$(ls -td "$runs"/prune/*/ | head -1)
    python -c "import json,sys; s=json.load(open(sys.argv[1]+'summary.json')); print(sys.argv[2], 'seed', sys.argv[3], 'dense', round(s['dense']['test_top1'],2), 'pruned', round(s['final']['test/top1'],2), 'params', s['dense']['params'], '->', s['pruned']['nonzero_params'], 'speedup_b64', round(s['speedup_cpu_b64'],2))" "$run" "${recipe%% *}" "$seed"
  done
done
