r"""Every optimizer on one problem with its best configuration, over several seeds.

    python -m tuning.reproduce --problem=digits_autoencoder --seeds=3 \
        --output=docs/reproduction/digits_autoencoder
    python -m tuning.reproduce --problem=mnist_autoencoder --seeds=5 --best_dir=runs/sweeps \
        --data_dir=~/tensorflow_datasets --output=reports/mnist_autoencoder

For each optimizer of ``models.registry.OPTIMIZERS`` (or ``--optimizers``), the configuration is
the sweep's ``BEST_DIR/PROBLEM-OPTIMIZER/best.flags`` when ``--best_dir`` has one, else the
registry's defaults (the published best values, where the authors published them). The budget
and the seed are this command's, the same for all optimizers: the budget flags of a best flag
file (``--epochs``, ``--time_budget_s``, ``--steps_per_epoch``, ``--seed``) are dropped, and any
``train.py`` flag given here (``--epochs=10``, ``--time_budget_s=60``, ``--data_dir=...``) goes
to every run, after the best flags. Seeds are 0, 1, ..., ``--seeds`` - 1.

Each run is ``python train.py --flagfile=RUNS_DIR/PROBLEM/OPTIMIZER-sSEED.flags`` into
``RUNS_DIR/PROBLEM/OPTIMIZER-sSEED`` (log next to it); started again, finished runs are skipped and
interrupted ones resume. Written: ``OUTPUT.csv`` and ``OUTPUT.md`` (per optimizer, mean and
standard deviation over seeds of the final and best metrics, epochs and seconds; see
:mod:`tuning.results`), ``OUTPUT_runs.csv`` (one row per run), ``OUTPUT_targets.csv`` (seconds
and epochs to each of ``--targets``, also in the Markdown) and ``OUTPUT.png`` (mean curve with a
±1 std band, against epochs and against training time without tracing).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's C++ logging starts

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import train  # noqa: E402
from models import registry  # noqa: E402
from models import runtime  # noqa: E402
from tuning import common  # noqa: E402
from tuning import results  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_integer("seeds", 3, "Seeds per optimizer (0, 1, ..., N-1).")
flags.DEFINE_list("optimizers", None, "Optimizers (default: every one of the registry).")
flags.DEFINE_string("best_dir", None, "Sweep directory holding PROBLEM-OPTIMIZER/best.flags.")
flags.DEFINE_string(
    "output", None, "Prefix of the table and figure files (default: RUNS_DIR/PROBLEM)."
)
flags.DEFINE_string("runs_dir", os.path.join("runs", "reproduce"), "Where the runs go.")
flags.DEFINE_list(
    "targets",
    ["adam_final"],
    "Targets of the time-to-target table: numbers, or OPTIMIZER_final (that optimizer's mean "
    "final value of the selection metric).",
)
flags.register_validator("seeds", lambda v: v >= 1, message="--seeds must be >= 1")

# What this command sets per run (the rest of a best flag file is the optimizer's configuration).
_PER_RUN = ("problem", "optimizer", *common.BUDGET_FLAGS, *common.RUN_FLAGS)


def best_flagfile(best_dir: str | None, problem: str, optimizer: str) -> str | None:
    """The sweep's best flag file of this problem and optimizer, if ``best_dir`` holds one."""
    if not best_dir:
        return None
    path = os.path.join(best_dir, f"{problem}-{optimizer}", "best.flags")
    return path if os.path.exists(path) else None


def configuration_flags(flagfile: str, problem: str, optimizer: str) -> list[str]:
    """The lines of a best flag file that set the configuration (not the budget, seed, output)."""
    lines = common.read_flagfile(flagfile)
    for name, expected in (("problem", problem), ("optimizer", optimizer)):
        found = [line.split("=", 1)[-1] for line in lines if common.flag_name(line) == name]
        if found and found[-1] != expected:
            raise ValueError(f"--best_dir: {flagfile} is for --{name}={found[-1]}, not {expected}")
    return [line for line in lines if common.flag_name(line) not in _PER_RUN]


def reproduce(
    problem: str,
    seeds,
    output: str,
    optimizers=None,
    best_dir: str | None = None,
    train_flags=(),
    runs_dir: str = os.path.join("runs", "reproduce"),
    runner=common.run_train,
    command: str | None = None,
    targets=(),
) -> list[dict]:
    """Runs every (optimizer, seed), then writes the table and figure; returns the table rows.

    ``optimizers`` defaults to ``models.registry.OPTIMIZERS`` as it is at call time. ``runner``
    is :func:`tuning.common.run_train` (a test may pass a stand-in with its signature).
    Runs that fail are reported on stderr and left out of the table; if any failed, a
    ``RuntimeError`` is raised after the table is written. ``targets``: the time-to-target
    table's targets (numbers, or ``OPTIMIZER_final``; see :func:`tuning.results.resolve_targets`).
    """
    registry.get(problem)
    optimizers = list(optimizers or registry.OPTIMIZERS)
    unknown = [o for o in optimizers if o not in registry.OPTIMIZERS]
    if unknown:
        raise ValueError(
            f"--optimizers: {', '.join(unknown)} unknown; choose from "
            f"{', '.join(registry.OPTIMIZERS)}"
        )
    targets = [str(t).strip() for t in targets]
    for spec in targets:
        if spec.endswith("_final"):
            if spec[: -len("_final")] not in optimizers:
                raise ValueError(
                    f"--targets: {spec!r} names no optimizer of this run; use a number or one "
                    f"of {', '.join(o + '_final' for o in optimizers)}"
                )
        else:
            results.resolve_targets([spec], [], "")  # a number, or a clear error
    seeds = list(seeds)
    if not seeds:
        raise ValueError("--seeds must be >= 1")
    for line in train_flags:
        if not line.startswith("--") or common.flag_name(line) in ("problem", "optimizer", "seed"):
            raise ValueError(f"train flag {line!r} is not allowed: reproduce sets it per run")
        if common.flag_name(line) in common.RUN_FLAGS:
            raise ValueError(f"train flag {line!r} is not allowed: use --runs_dir")
    runs_root = os.path.abspath(os.path.join(runs_dir, problem))
    os.makedirs(runs_root, exist_ok=True)

    plans = []
    sources = {}
    for optimizer in optimizers:
        flagfile = best_flagfile(best_dir, problem, optimizer)
        configuration = configuration_flags(flagfile, problem, optimizer) if flagfile else []
        sources[optimizer] = f"sweep ({flagfile})" if flagfile else "registry defaults"
        for seed in seeds:
            run_dir = os.path.join(runs_root, f"{optimizer}-s{seed}")
            lines = [f"--problem={problem}", f"--optimizer={optimizer}", *configuration]
            lines += [*train_flags, f"--seed={seed}", f"--output_dir={run_dir}", "--verbose=2"]
            plans.append((optimizer, seed, run_dir, lines))

    # A run directory left by other flags (e.g. before a sweep found a better configuration)
    # would make train.py refuse, hours in: say so before starting anything.
    stale = [
        run_dir
        for _, _, run_dir, lines in plans
        if os.path.exists(os.path.join(run_dir, "flags.json"))
        and (
            not os.path.exists(run_dir + ".flags")
            or common.read_flagfile(run_dir + ".flags") != lines
        )
    ]
    if stale:
        raise ValueError(
            f"--runs_dir: {', '.join(stale)} hold runs with other flags; remove them or use "
            "another --runs_dir"
        )

    start = time.monotonic()
    failures = []
    for i, (optimizer, seed, run_dir, lines) in enumerate(plans, start=1):
        flagfile, log = run_dir + ".flags", run_dir + ".log"
        done = os.path.exists(os.path.join(run_dir, "summary.json"))
        tag = f"[{i}/{len(plans)}, {time.monotonic() - start:.0f} s] {optimizer} seed {seed}"
        if done:
            print(f"{tag}: done before, skipped", flush=True)
            continue
        print(f"{tag}: python train.py --flagfile={flagfile}", flush=True)
        status = runner(lines, flagfile, log)
        if status != 0:
            failures.append((optimizer, seed, log))
            print(
                f"error: {optimizer} seed {seed} failed (status {status}); the end of {log}:\n"
                + common.log_tail(log),
                file=sys.stderr,
            )

    failed = {(o, s) for o, s, _ in failures}
    runs = {
        optimizer: [
            results.load_run(run_dir)
            for o, seed, run_dir, _ in plans
            if o == optimizer and (o, seed) not in failed
        ]
        for optimizer in optimizers
    }
    if not any(runs.values()):
        raise RuntimeError(f"Every run failed; see the logs under {runs_root}")
    rows = write_report(runs, problem, output, sources, command, targets)
    if failures:
        raise RuntimeError(
            f"{len(failures)} run(s) failed: "
            + ", ".join(f"{o} seed {s} (log {log})" for o, s, log in failures)
        )
    return rows


def write_report(
    runs, problem: str, output: str, sources=None, command: str | None = None, targets=()
):
    """Writes OUTPUT.csv, OUTPUT_runs.csv, OUTPUT.md and OUTPUT.png (and OUTPUT_targets.csv when
    ``targets`` are given, see :func:`tuning.results.resolve_targets`); returns the table rows."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    rows = results.table_rows(runs, problem, sources)
    criterion, _ = results.report_metrics(problem)
    present = {r["optimizer"] for r in rows}
    missing = [t for t in targets if t.endswith("_final") and t[: -len("_final")] not in present]
    if missing:
        print(f"note: no finished run for the target(s) {', '.join(missing)}", file=sys.stderr)
    targets = [t for t in targets if t not in missing]
    resolved = results.resolve_targets(targets, rows, criterion.metric)
    results.write_csv(rows, output + ".csv")
    results.write_csv(results.per_run_rows(runs, problem), output + "_runs.csv")
    target_rows = results.target_rows(runs, problem, resolved)
    if target_rows:
        results.write_csv(target_rows, output + "_targets.csv")
    title = f"{problem}: mean ± std over seeds"
    results.plot_curves(
        runs, results.figure_metrics(problem), output + ".png", title, zoom=bool(targets)
    )
    criterion, _ = results.report_metrics(problem)
    name = os.path.basename(output)
    best = "lowest" if criterion.direction == "min" else "highest"
    text = [f"# {problem}: every optimizer over seeds\n"]
    if command:
        text.append(f"Command: `{command}`\n")
    text += [
        f"Final: the last epoch's value; best: the {best} `{criterion.metric}` at an epoch end. "
        "Cells are mean ± sample standard deviation (ddof=1) over seeds. Training seconds "
        'count the training steps only; "of which tracing" is the first epoch\'s training '
        "time beyond the median epoch's (the step function's tracing, once per process); the "
        "warm start (second-order methods: one pass of statistics before the first step, its "
        "own tracing included) is not in the training seconds.\n",
        results.markdown_table(rows, problem),
        "Configurations: "
        + "; ".join(f"{common.label(r['optimizer'])}: {r['source'] or '?'}" for r in rows)
        + ".\n",
        *(
            [
                f"Time to target: the first epoch end at which `{criterion.metric}` reaches the "
                "target; seconds of training without tracing, mean ± std over the seeds that "
                "reached it.\n",
                results.markdown_target_table(target_rows),
            ]
            if target_rows
            else []
        ),
        f"![{problem}]({name}.png)\n",
        "The time panels leave out each run's tracing time (see above): a curve starts at its "
        "first epoch's end, at the cost of a typical epoch.\n",
        f"Per run: [{name}_runs.csv]({name}_runs.csv); table: [{name}.csv]({name}.csv).\n",
    ]
    with open(output + ".md", "w") as f:
        f.write("\n".join(text))
    return rows


def main(argv):
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        for name in ("optimizer", "seed", "output_dir"):
            if FLAGS[name].present:
                raise ValueError(
                    f"--{name}: reproduce sets it per run (use --optimizers, --seeds, --runs_dir)"
                )
        exclude = {"problem", *common.RUN_FLAGS}
        train_module_flags = FLAGS.flags_by_module_dict().get(train.__name__, [])
        train_flags = [
            f.serialize() for f in train_module_flags if f.present and f.name not in exclude
        ]
        targets = FLAGS.targets or []
        if not FLAGS["targets"].present:  # the default, where Adam is one of the optimizers
            optimizers = FLAGS.optimizers or registry.OPTIMIZERS
            targets = [t for t in targets if t[: -len("_final")] in optimizers]
        reproduce(
            FLAGS.problem,
            range(FLAGS.seeds),
            FLAGS.output or os.path.join(FLAGS.runs_dir, FLAGS.problem),
            optimizers=FLAGS.optimizers,
            best_dir=FLAGS.best_dir,
            train_flags=train_flags,
            runs_dir=FLAGS.runs_dir,
            command=" ".join(["python -m tuning.reproduce", *sys.argv[1:]]),
            targets=targets,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    output = FLAGS.output or os.path.join(FLAGS.runs_dir, FLAGS.problem)
    print(f"wrote {output}.csv, {output}_runs.csv, {output}.md, {output}.png")


if __name__ == "__main__":
    app.run(main)
