#!/usr/bin/env bash
# The committed digits reproduction (docs/reproduction/): every optimizer of the registry swept
# on both digits problems, then 3 seeds of each at its best configuration.
#
#   autoencoder: learning rate (5 points of the 1-3 ladder around the registry's value) x
#                damping (3 points; Adam: its ε; SGD-m: none), lowest smoothed training loss
#   classifier:  learning rate (3 points) x decoupled weight decay {0, 0.01, 0.1}, highest
#                validation accuracy
#   a grid whose best learning rate is on its edge is extended by two ladder points past that
#   edge (same other axes), once; the better of the two sweeps is the optimizer's configuration
#
# Usage: bash tuning/digits.sh   (about 70 minutes on 2 CPU cores; finished trials and runs
# are skipped when it is started again)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEPS=${SWEEPS:-runs/sweeps_digits}
BEST=${BEST:-runs/sweeps_digits_best}
RUNS=${RUNS:-runs/reproduce_digits}
OPTIMIZERS=$($PY -c "from models import registry; print(' '.join(registry.OPTIMIZERS))")

source tuning/ladder.sh

for optimizer in $OPTIMIZERS; do
  sweep digits_autoencoder "$optimizer" \
    --learning_rates="$(learning_rates digits_autoencoder "$optimizer" 2)"
  sweep digits_classifier "$optimizer" --weight_decays=0,0.01,0.1
done
for problem in digits_autoencoder digits_classifier; do
  $PY -m tuning.reproduce --problem="$problem" --seeds=3 --best_dir="$BEST" \
    --runs_dir="$RUNS" --output="docs/reproduction/$problem"
done

# The per-second race (docs/reproduction/digits_autoencoder_race.md): the autoencoder's best
# configurations again, 3 seeds each, for 30 s of training per run instead of 30 epochs (every
# optimizer is then in its slow phase: see docs/guide/reproduction.md), validated every 50
# epochs and checkpointed every 100 (epochs take ~70 ms here); the table adds the time to reach Adam's
# final loss and a harder target. About 30 minutes.
$PY -m tuning.reproduce --problem=digits_autoencoder --seeds=3 --best_dir="$BEST" \
  --runs_dir="$RUNS-race" --output=docs/reproduction/digits_autoencoder_race \
  --epochs=1000000 --time_budget_s=30 --validation_freq=50 --checkpoint_every_epochs=100 \
  --targets=adam_final,15.05
