# Helpers of the committed studies (tuning/digits.sh, tuning/transformer.sh): sourced, not run.
# Needs PY, SWEEPS and BEST set by the caller.

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
