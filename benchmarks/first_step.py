r"""Time to the first training step (build, trace, run) of TNT, Shampoo and KFAC against Adam.

A second-order optimizer keeps several variables per weight and branches (statistics due,
inverses due) in its step; on TensorFlow all of it is traced into the training function before
the first step runs, which a user waits for at the start of every ``fit``. For each problem of
the registry named in ``--problems`` and each optimizer, a fresh Python process builds the
problem's model with the registry's settings (T1, T2, learning rate, damping), compiles it and
times its first ``train_on_batch`` (one synthetic batch of the problem's batch size: optimizer
build, tracing, graph optimisation, the step), then the mean of ``--steps`` further steps.
Every process runs the same work in the same order; the optimizers alternate across
``--runs`` rounds. Prints per optimizer the median [min-max] of the first call, its ratio to
Adam's median, and the steady step time. Usage::

    python -m benchmarks.first_step
    python -m benchmarks.first_step --problems=digits_transformer,mnist_autoencoder --runs=3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
OPTIMIZERS = ("adam", "tnt", "shampoo", "kfac")

if __name__ == "__main__":
    flags.DEFINE_list("problems", ["digits_transformer", "mnist_autoencoder"], "Registry names.")
    flags.DEFINE_list("optimizers", list(OPTIMIZERS), "Which optimizers (adam is the baseline).")
    flags.DEFINE_integer("runs", 3, "Fresh processes per problem and optimizer.")
    flags.DEFINE_integer("steps", 10, "Steps timed after the first one.")
    flags.DEFINE_string("child", "", "Internal: 'problem,optimizer' to measure in this process.")


def _optimizer(problem, name):
    import keras

    import keras_tnt

    settings = dict(problem.defaults[name])
    if name == "adam":
        return keras.optimizers.Adam(**settings)
    periods = {
        "curvature_update_period": problem.curvature_update_period,
        "inverse_update_period": problem.inverse_update_period,
    }
    return {"tnt": keras_tnt.TNT, "shampoo": keras_tnt.Shampoo, "kfac": keras_tnt.KFAC}[name](
        **settings, **periods
    )


def _batch(model, problem, rng):
    """One synthetic batch with the shapes and dtypes of the problem's data."""

    from models import data

    shape = (problem.batch_size,) + tuple(model.inputs[0].shape[1:])
    if "int" in model.inputs[0].dtype:
        x = rng.integers(0, data.DIGITS_TOKEN_VOCABULARY, size=shape).astype("int32")
    else:
        x = rng.uniform(0, 1, size=shape).astype("float32")
    if problem.classifier:
        return x, rng.integers(0, model.output_shape[-1], size=problem.batch_size)
    return x, x.reshape((problem.batch_size,) + tuple(model.output_shape[1:]))


def measure(problem_name: str, optimizer_name: str, steps: int) -> dict:
    """The first ``train_on_batch`` and the mean of ``steps`` more, in seconds (this process)."""
    import keras
    import numpy as np

    from models import registry

    problem = registry.get(problem_name)
    keras.utils.set_random_seed(0)
    model = problem.build()
    model.compile(optimizer=_optimizer(problem, optimizer_name), loss=problem.loss())
    x, y = _batch(model, problem, np.random.default_rng(0))
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)
    step = (time.perf_counter() - start) / steps
    if not np.isfinite(loss):
        raise FloatingPointError(f"{problem_name}/{optimizer_name}: loss {loss}")
    return {"first_s": first, "step_s": step}


def _child(problem_name: str, optimizer_name: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.first_step",
        f"--child={problem_name},{optimizer_name}",
        f"--steps={FLAGS.steps}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if out.returncode:
        raise RuntimeError(f"{problem_name}/{optimizer_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(values, scale=1.0, digits=1):
    values = [v * scale for v in values]
    return (
        f"{statistics.median(values):.{digits}f} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


def main(argv):
    del argv
    if FLAGS.child:
        problem_name, optimizer_name = FLAGS.child.split(",")
        print(json.dumps(measure(problem_name, optimizer_name, FLAGS.steps)))
        return
    unknown = sorted(set(FLAGS.optimizers) - set(OPTIMIZERS))
    if unknown:
        raise app.UsageError(f"--optimizers: {unknown} not among {list(OPTIMIZERS)}")
    names = ["adam"] + [o for o in FLAGS.optimizers if o != "adam"]
    for problem_name in FLAGS.problems:
        results = {name: [] for name in names}
        for run in range(FLAGS.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                results[name].append(_child(problem_name, name))
        adam = statistics.median(r["first_s"] for r in results["adam"])
        print(f"\n{problem_name}: first train_on_batch, {FLAGS.runs} fresh processes each")
        print("| optimizer | first call s | × Adam | steady step ms |")
        print("| --- | --- | --- | --- |")
        for name in names:
            first = [r["first_s"] for r in results[name]]
            ratio = statistics.median(first) / adam
            step = _spread([r["step_s"] for r in results[name]], 1000)
            print(f"| {name} | {_spread(first)} | {ratio:.2f} | {step} |")
        sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
