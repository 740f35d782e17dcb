#!/usr/bin/env bash
# The committed transformer comparison (docs/reproduction/digits_transformer.md): TNT, Adam,
# Shampoo and Keras' Muon on the digits_transformer problem (scikit-learn's digits as 64
# intensity tokens, a 2-block transformer encoder), each swept by the same procedure, then 3
# seeds of each at its best configuration, 50 epochs (the registry's budget).
#
#   learning rate: 3 points of the 1-3 ladder centred on the registry's value, no weight decay,
#   damping (Adam: ε) the registry's; highest validation accuracy; a best learning rate on an
#   edge of the grid is extended by two ladder points past it, once (as tuning/digits.sh)
#
# Usage: bash tuning/transformer.sh   (about 45 minutes on 2 CPU cores; finished trials and runs
# are skipped when it is started again)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEPS=${SWEEPS:-runs/sweeps_transformer}
BEST=${BEST:-runs/sweeps_transformer_best}
RUNS=${RUNS:-runs/reproduce_transformer}
OPTIMIZERS=${OPTIMIZERS:-tnt adam shampoo muon}

source tuning/ladder.sh

for optimizer in $OPTIMIZERS; do
  sweep digits_transformer "$optimizer" --weight_decays=0 \
    --learning_rates="$(learning_rates digits_transformer "$optimizer" 1)"
done
$PY -m tuning.reproduce --problem=digits_transformer --seeds=3 --best_dir="$BEST" \
  --runs_dir="$RUNS" --output=docs/reproduction/digits_transformer \
  --optimizers="${OPTIMIZERS// /,}" --targets=adam_final
