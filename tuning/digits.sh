#!/usr/bin/env bash
# The committed digits reproduction (docs/reproduction/): every optimizer of the registry swept
# on both digits problems, then 3 seeds of each at its best configuration.
#
#   autoencoder: learning rate (5 points of the 1-3 ladder around the registry's value) x
#                damping (3 points; Adam: its ε; SGD-m: none), lowest smoothed training loss
#   classifier:  learning rate (3 points) x decoupled weight decay {0, 0.01, 0.1}, highest
#                validation accuracy
#
# Usage: bash tuning/digits.sh   (about 40 minutes on 2 CPU cores; finished trials and runs
# are skipped when it is started again)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEPS=${SWEEPS:-runs/sweeps_digits}
RUNS=${RUNS:-runs/reproduce_digits}
OPTIMIZERS=$($PY -c "from models import registry; print(' '.join(registry.OPTIMIZERS))")

learning_rates() {  # the registry's learning rate of $1/$2, with $3 ladder points on each side
  $PY - "$@" <<'PYEOF'
import sys
from models import registry
from tuning import common
problem, optimizer, side = registry.get(sys.argv[1]), sys.argv[2], int(sys.argv[3])
fallback = "tnt" if optimizer == "tnt_ef" else ""
defaults = problem.defaults.get(optimizer) or problem.defaults.get(fallback, {})
print(",".join(f"{v:g}" for v in common.log_grid(defaults.get("learning_rate", 1e-3), side)))
PYEOF
}

for optimizer in $OPTIMIZERS; do
  $PY -m tuning.sweep --problem=digits_autoencoder --optimizer="$optimizer" \
    --directory="$SWEEPS" --learning_rates="$(learning_rates digits_autoencoder "$optimizer" 2)"
  $PY -m tuning.sweep --problem=digits_classifier --optimizer="$optimizer" \
    --directory="$SWEEPS" --weight_decays=0,0.01,0.1
done
for problem in digits_autoencoder digits_classifier; do
  $PY -m tuning.reproduce --problem="$problem" --seeds=3 --best_dir="$SWEEPS" \
    --runs_dir="$RUNS" --output="docs/reproduction/$problem"
done
