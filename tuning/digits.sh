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

extension() {  # two ladder points past the edge where sweep $1 found its best learning rate
  $PY - "$1" <<'PYEOF'
import csv, json, sys
from tuning import common
project = sys.argv[1]
rates = sorted({float(r["learning_rate"]) for r in csv.DictReader(open(project + "/trials.csv"))})
best = json.load(open(project + "/best.json"))["hyperparameters"]["learning_rate"]
grid = common.log_grid(best, 2)
grid = grid[3:] if best == rates[-1] else grid[:2] if best == rates[0] else []
print(",".join(f"{v:g}" for v in grid))
PYEOF
}

better() {  # copies the better best.flags of projects $2 and $3 to $1
  $PY - "$@" <<'PYEOF'
import json, os, shutil, sys
target, projects = sys.argv[1], [p for p in sys.argv[2:] if os.path.exists(p + "/best.json")]
bests = [json.load(open(p + "/best.json")) for p in projects]
sign = 1 if bests[0]["direction"] == "min" else -1
winner = min(range(len(bests)), key=lambda i: (sign * bests[i]["score"], i))
os.makedirs(target, exist_ok=True)
shutil.copy(projects[winner] + "/best.flags", target + "/best.flags")
print(f"{target}: {projects[winner]} ({bests[winner]['hyperparameters']})")
PYEOF
}

sweep() {  # problem optimizer [extra sweep flags]
  local problem=$1 optimizer=$2
  shift 2
  local project="$SWEEPS/$problem-$optimizer"
  $PY -m tuning.sweep --problem="$problem" --optimizer="$optimizer" --directory="$SWEEPS" "$@"
  local more
  more=$(extension "$project")
  if [ -n "$more" ]; then
    $PY -m tuning.sweep --problem="$problem" --optimizer="$optimizer" --directory="$SWEEPS" \
      --project_name="$problem-$optimizer-extended" "$@" --learning_rates="$more"
  fi
  better "$BEST/$problem-$optimizer" "$project" "$project-extended"
}

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
# optimizer is then in its slow phase: see the README), validated every 50 epochs and
# checkpointed every 100 (epochs take ~70 ms here); the table adds the time to reach Adam's
# final loss and a harder target. About 30 minutes.
$PY -m tuning.reproduce --problem=digits_autoencoder --seeds=3 --best_dir="$BEST" \
  --runs_dir="$RUNS-race" --output=docs/reproduction/digits_autoencoder_race \
  --epochs=1000000 --time_budget_s=30 --validation_freq=50 --checkpoint_every_epochs=100 \
  --targets=adam_final,15.05
