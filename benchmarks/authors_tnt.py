r"""Step time of the authors' released PyTorch TNT against an Adam step on the same model.

A reference point for ``benchmarks/step_time.py`` (and ``benchmarks/kfac_jax_tnt.py``): the
TNT/Adam step-time ratio of Ren & Goldfarb's own implementation of Tensor Normal Training
(``renyiryry/tnt_neurips_2021``, the code behind the paper's figures), measured on the MNIST deep
autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU hidden layers, linear 30-unit code,
sigmoid cross-entropy summed over the 784 outputs and averaged over the batch), batch 1000,
synthetic inputs uniform in [0, 1] (float32, target = input), Glorot-uniform weights and zero
biases, float32 on the CPU with ``torch.set_num_threads(--threads)`` (default 2).

The model, the loss and every optimizer operation are the authors' code, imported unmodified from
their ``utils_git`` package (``--authors_repo``): their ``Model_3`` ("MNIST-autoencoder-relu-N1-
1000-sum-loss-no-regularization"), their ``get_params`` / ``train_initialization`` (warm start
included) and, per step, the statements of the loop body of their ``train`` (``utils.py`` lines
11723-12224 of the released HEAD, commit 266d0aa) that compute the update:
``model.forward`` (11723), ``get_loss_from_z`` and ``loss.item()`` (11728-11734),
``zero_grad`` / ``backward(retain_graph=True)`` (11773-11776), ``get_model_grad`` and
``from_unregularized_grad_to_regularized_grad`` (11781-11786), the NaN checks on ``z`` and on the
gradient (11789, 11837), the gradient momentum (11870-11888), ``get_second_order_caches`` (11905-
11912: Bernoulli targets drawn from sigmoid(z) and a second backward pass through the retained
graph, on statistics steps), ``shampoo_update`` (12016, ``utils_shampoo.py``: per-mode
contractions with EMA in ``shampoo_kron_matrices_per_variable``, trace-normalised damped LU
inverses in ``shampoo_inversion_per_variable``, the preconditioned momentum in
``shampoo_compute_direction_per_variable``) or ``RMSprop_update`` (12047), ``update_parameter``
(12190) and the NaN check on the weights (12224). This script transcribes only the drivers: the
set-up statements of ``train`` (10957-11430) and that loop body (``train`` also reads data, logs
and evaluates, and cannot be run a step at a time); it asserts that the branches it leaves out
(LM damping, sign/VA/yura variants, LR decay, weight decay) are off. Not timed, as in
``step_time.py``: batch loading, and the logging-only running minibatch accuracy and loss
(``get_acc_from_z``, 11736-11753). Their modules import matplotlib, scipy, psutil and torchvision
without using them on this path: whichever is not installed is replaced by an empty module.

Configurations (those of the authors' ``jupyter_functions.train_model`` for dataset "MNIST"):

* ``adam``: the authors' Adam, the one of the paper's figures ("Adam-noWarmStart-momentum-grad"):
  lr 1e-4, ``m <- 0.9 m + 0.1 g``, bias correction, then their variant of the second moment, which
  squares the bias-corrected momentum rather than the gradient, ``eps = 1e-4`` (the paper's
  tuned value) added to its square root. The TNT/Adam ratios are against this one;
* ``torch_adam``: ``torch.optim.Adam(lr=1e-4)`` (standard Adam, eps 1e-8) on the same model and
  loss, ordinary backward, for the ratio against a standard Adam (column ``sch/tA``);
* ``tnt_T1=1_T2=20`` and ``tnt_T1=10_T2=100``: their TNT
  ("matrix-normal-correctFisher-same-trace-allVariables-KFACReshaping-warmStart-momentum-grad"),
  lr 1e-4, damping ``shampoo_epsilon = 0.1``, statistics EMA ``shampoo_decay = 0.9`` /
  ``shampoo_weight = 0.1``, gradient momentum ``rho = 0.9`` with dampening 0 (``m <- 0.9 m + g``),
  statistics every ``T1`` steps (``shampoo_update_freq``), inverses every ``T2`` steps
  (``shampoo_inverse_freq``; every ``T1`` steps while the step count is below ``T2``), after a warm
  start (running mean of the statistics over ``--warm_start_batches`` batches; theirs runs one
  epoch, 60 batches of MNIST). These are the arguments of ``keras_tnt.TNT(LR, 0.1, 0.9, 0.9, T1,
  T2)`` in ``step_time.py`` (damping, momentum, statistics decay, T1, T2).

Where their choices differ from keras-tnt's TNT (docs/algorithm.md describes both): they invert
each factor with ``torch.Tensor.inverse`` (LU) in float32 where keras-tnt uses a Cholesky solve;
they keep the whole autograd graph of every step (``retain_graph=True``, also on the steps
without statistics when T1 > 1) and run their per-tensor arithmetic as Python loops over lists of
dicts (``get_plus_torch`` etc.), with a ``copy.deepcopy`` of the gradients and three NaN checks
(reductions over ``z``, every gradient and every weight, read back by Python) per step. As in
keras-tnt: the statistics are contractions of the one batch-mean sampled gradient, ``ε`` is added
to every trace-normalised factor, each bias gets one full, unnormalised ``d x d`` factor, the
momentum (no ``1-β`` factor) is what gets preconditioned. The weights here are Glorot uniform
(the paper's runs used PyTorch's default ``nn.Linear`` init), the learning rate is 1e-4
(``step_time.py`` uses 1e-5 to keep its many short runs finite; the step time does not depend on
it) and the data synthetic (``step_time.py`` upsamples scikit-learn's digits); the demo notebook
ran 8 threads on a GPU.

Each configuration is warmed up (3 steps; a TNT configuration then jumps its step counter to
``T2 - 1`` and takes one more untimed step, so the timed steps have counter >= T2 and the inverses
refresh every ``T2`` steps), then the configurations alternate in rounds; a round times
``--adam_steps`` steps of each Adam and a whole number of inverse periods of each TNT
configuration (``--tnt_periods`` x ``T2`` steps, so the refresh steps are inside the window). CPU
torch is synchronous and each step returns after its update (the authors' steps end with the NaN
check on the weights, torch Adam's with ``loss.item()``), so each step is timed after its update
has completed. Each TNT step's kind is also checked against what their code did (inverses
replaced: refresh; else statistics replaced: statistics; else plain); mismatches are reported.
The table gives the median and the mean step, the median of each kind of step (inverse refresh,
statistics only, plain), their schedule-weighted mean (as ``step_time.py`` reports for keras_tnt)
and the ratios against the authors' Adam (``/A``: median, mean, schedule-weighted mean over
Adam's median) and against ``torch.optim.Adam`` (``sch/tA``). ``--print_steps`` prints every
timed step (counter, kind, kind done, time, loss), to check the schedule and that the loss goes
down.

This script is not part of keras_tnt and is kept out of its (test) dependencies; it needs only
torch and numpy. Get the authors' code and run it in its own virtual environment::

    git clone https://github.com/renyiryry/tnt_neurips_2021 /tmp/tnt_neurips_2021
    # or, from the stored snapshot on this machine (no work tree):
    #   mkdir -p DIR && git -C /work/.mirror/renyiryry+tnt_neurips_2021/repo archive HEAD \
    #     | tar -x -C DIR
    python3 -m venv /work/torchenv && /work/torchenv/bin/pip install torch numpy
    /work/torchenv/bin/python benchmarks/authors_tnt.py \
        --authors_repo=/tmp/tnt_neurips_2021/utils_git [--rounds=3] [--output=out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import types

import numpy as np
import torch

LAYERS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
DATASET = "MNIST-autoencoder-relu-N1-1000-sum-loss-no-regularization"
TNT_ALGORITHM = "matrix-normal-correctFisher-same-trace-allVariables-KFACReshaping-warmStart"
ADAM_ALGORITHM = "Adam-noWarmStart"
# Modules the authors' files import at the top but never use on the path timed here.
UNUSED_IMPORTS = (
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib.ticker",
    "scipy",
    "psutil",
    "torchvision",
    "torchvision.transforms",
    "torchvision.datasets",
)
# Branches of their `train` loop that this driver leaves out; each must be off.
OFF_FLAGS = (
    "if_LM",
    "if_lr_decay",
    "if_momentum_p",
    "if_VA_p",
    "if_signVAsqrt",
    "if_signVA",
    "if_signVAerf",
    "if_sign",
    "if_Adam",
    "if_yura",
    "if_different_minibatch",
    "if_record_sgn_norm",
)


def git_blob_id(path):
    """The id git gives the file's content (compare with `git ls-tree HEAD` of their repo)."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_authors(path):
    """Imports the authors' `utils_git` package from its directory (or the checkout above it)."""
    root = os.path.abspath(path)
    if os.path.basename(root) == "utils_git":
        root = os.path.dirname(root)
    if not os.path.isfile(os.path.join(root, "utils_git", "utils.py")):
        raise SystemExit(f"--authors_repo: no utils_git/utils.py under {root}")
    stubbed = []
    for name in UNUSED_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
            stubbed.append(name)
    sys.path.insert(0, root)
    utils = importlib.import_module("utils_git.utils")  # sets warnings to errors, as in theirs
    shampoo = importlib.import_module("utils_git.utils_shampoo")
    kfac = importlib.import_module("utils_git.utils_kfac")
    ids = {
        f: git_blob_id(os.path.join(root, "utils_git", f))[:7]
        for f in ("utils.py", "utils_shampoo.py", "utils_get_params.py")
    }
    return types.SimpleNamespace(utils=utils, shampoo=shampoo, kfac=kfac, stubbed=stubbed, ids=ids)


class Batches:
    """Stands in for their `DataSet` (`utils_data.py`): only `next_batch`, used by the warm start.
    Target = input, as for their autoencoders."""

    def __init__(self, batches):
        self.batches, self.k = batches, 0

    def next_batch(self, n):
        x = self.batches[self.k % len(self.batches)]
        self.k += 1
        assert len(x) == n
        return x, x


def authors_args(au, algorithm, args, t1=1, t2=20):
    """The args of their `jupyter_functions.train_model(dataset_name="MNIST", ...)`, completed
    as their `tune_lr` does."""
    a = {
        "list_lr": [args.lr],
        "weight_decay": 0,
        "dataset": DATASET,
        "initialization_pkg": "normal",
        "if_max_epoch": 0,
        "max_epoch/time": 500,
        "momentum_gradient_rho": args.momentum,
        "record_epoch": 1,
        "seed_number": 9999,
        "num_threads": args.threads,
        "home_path": os.getcwd() + "/",
        "if_gpu": False,
        "if_test_mode": False,
        "if_auto_tune_lr": False,
        "if_grafting": False,
    }
    if algorithm == "TNT":
        a.update(
            algorithm=TNT_ALGORITHM + "-momentum-grad",
            shampoo_if_coupled_newton=False,
            shampoo_epsilon=args.damping,
            if_Hessian_action=False,
            shampoo_decay=args.statistics_decay,
            shampoo_weight=1 - args.statistics_decay,
            momentum_gradient_dampening=0,
            shampoo_update_freq=t1,
            shampoo_inverse_freq=t2,
        )
    else:
        a.update(
            algorithm=ADAM_ALGORITHM + "-momentum-grad",
            RMSprop_epsilon=args.adam_epsilon,
            RMSprop_beta_2=0.999,
            momentum_gradient_dampening=args.momentum,  # i.e. beta_1
        )
    u = au.utils
    a["name_loss"] = u.get_name_loss(a["dataset"])
    a = u.from_dataset_to_N1_N2(a)
    a["N1"] = a["N2"] = args.batch_size
    a = u.add_matrix_name_to_args(a)
    a = u.add_some_if_record_to_args(a)
    a["lambda_"] = 1
    a["alpha"] = args.lr
    return a


def glorot_(model, init):
    """Overwrites the weights with `init` (Glorot uniform, as Keras' default) and zero biases."""
    with torch.no_grad():
        for layer, w in zip(model.layers_weight, init):
            layer["W"].copy_(torch.from_numpy(w))
            layer["b"].zero_()


def build_authors(au, algorithm, args, init, np_batches, t1=1, t2=20):
    """The set-up part of their `train` (utils.py 10957-11430) for one configuration."""
    u = au.utils
    a = authors_args(au, algorithm, args, t1, t2)
    params = {
        "list_algorithm_shampoo": au.shampoo.list_algorithm,
        "list_algorithm_kfac": au.kfac.list_algorithm,
        "initialization_pkg": a["initialization_pkg"],
        "seed_number": a["seed_number"],
        "num_threads": a["num_threads"],
        "home_path": a["home_path"],
        "if_gpu": False,
        "if_test_mode": False,
        "device": torch.device("cpu"),
        "algorithm": a["algorithm"],
        "matrix_name": a["matrix_name"],
        "if_records": {},
        "if_max_epoch": a["if_max_epoch"],
        "max_epoch/time": a["max_epoch/time"],
        "name_dataset": a["dataset"],
        "name_loss": a["name_loss"],
        "momentum_gradient_rho": a["momentum_gradient_rho"],
        "momentum_gradient_dampening": a["momentum_gradient_dampening"],
    }
    for key in a:
        if key.startswith("if_record_"):
            params[key] = a[key]
    model = u.get_model(params)
    glorot_(model, init)
    params.update(
        name_model=model.name_model,
        layersizes=model.layersizes,
        layers_params=model.layers_params,
        N1=a["N1"],
        N2=a["N2"],
        if_dataset_onTheFly=False,
        num_train_data=a["N1"] * args.warm_start_batches,
        alpha=a["alpha"],
        alpha_current=a["alpha"],
        numlayers=model.numlayers,
    )
    data_ = {"dataset": types.SimpleNamespace(train=Batches(np_batches)), "model": model}
    params = u.get_params(params, a)
    params["tau"] = a["tau"]
    data_, params = u.train_initialization(data_, params, a)  # TNT: the warm start
    if params["if_momentum_gradient"]:
        data_["model_grad_momentum"] = u.get_zero_torch(params)
    bad = [k for k in OFF_FLAGS if params.get(k)]
    if bad or params["tau"] != 0 or params["weight_decay"] != 0:
        raise RuntimeError(f"branches this driver does not run are on: {bad}")
    is_tnt = algorithm == "TNT"
    if params["if_second_order_algorithm"] != is_tnt or params["algorithm"] != (
        TNT_ALGORITHM if is_tnt else ADAM_ALGORITHM
    ):
        raise RuntimeError(f"unexpected set-up: {params['algorithm']}")
    return data_, params


def authors_step(au, data_, params, x, i):
    """One iteration of their `train` loop (utils.py 11723-12224), less data loading and logging."""
    u = au.utils
    model = data_["model"]
    params["i"] = i
    z, a, h = model.forward(x)
    loss = u.get_loss_from_z(model, z, x, "mean")
    loss_value = loss.item()
    model.zero_grad()
    if params["if_second_order_algorithm"] and params["matrix_name"] == "Fisher-correct":
        loss.backward(retain_graph=True)
    else:
        loss.backward()
    model_grad_torch = u.get_model_grad(model, params)
    data_["model_grad_torch_unregularized"] = model_grad_torch
    model_grad_torch = u.from_unregularized_grad_to_regularized_grad(
        model_grad_torch, data_, params
    )
    if torch.sum(z != z):
        raise FloatingPointError(f"step {i}: nan in z")
    data_["model_grad_torch"] = model_grad_torch
    if u.get_if_nan(model_grad_torch):
        raise FloatingPointError(f"step {i}: nan in the gradient")
    if params["if_momentum_gradient"]:
        rho = params["momentum_gradient_rho"]
        dampening = params["momentum_gradient_dampening"]
        data_["model_grad_momentum"] = u.get_plus_torch(
            u.get_multiply_scalar(rho, data_["model_grad_momentum"]),
            u.get_multiply_scalar(1 - dampening, model_grad_torch),
        )
        data_["model_grad_used_torch"] = data_["model_grad_momentum"]
    else:
        data_["model_grad_used_torch"] = model_grad_torch
    if params["if_second_order_algorithm"]:
        data_["X_mb"] = x
        data_["t_mb"] = x
        data_ = u.get_second_order_caches(z, a, h, data_, params)
    if params["algorithm"] in au.shampoo.list_algorithm:
        data_, params = au.shampoo.shampoo_update(data_, params)
    else:
        data_ = u.RMSprop_update(data_, params)
    model = u.update_parameter(data_["p_torch"], model, params)
    if u.get_if_nan(model.layers_weight):
        raise FloatingPointError(f"step {i}: nan in the weights")
    return loss_value


def make_authors(au, algorithm, args, init, np_batches, t1=1, t2=20):
    data_, params = build_authors(au, algorithm, args, init, np_batches, t1, t2)

    def run(x, i):
        return authors_step(au, data_, params, x, i)

    return run, data_


def make_torch_adam(au, args, init):
    params = {
        "name_dataset": DATASET,
        "name_loss": au.utils.get_name_loss(DATASET),
        "initialization_pkg": "normal",
        "if_gpu": False,
        "device": torch.device("cpu"),
    }
    model = au.utils.get_model(params)
    glorot_(model, init)
    variables = [layer[k] for layer in model.layers_weight for k in ("W", "b")]
    opt = torch.optim.Adam(variables, lr=args.lr)

    def run(x, i):
        del i
        z, _, _ = model.forward(x)
        loss = au.utils.get_loss_from_z(model, z, x, "mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return run


def step_kind(i, t1, t2):
    if not t2:
        return "plain"
    period = t1 if i < t2 else t2
    if i % period == 0:
        return "refresh"
    return "stats" if i % t1 == 0 else "plain"


def probe(data_):
    """Identities of the first layer's kernel inverses and first statistic: their code replaces
    these objects when it refreshes the inverses and when it updates the statistics."""
    return id(data_["shampoo_H_LM_minus_2k"][0].get("W")), id(data_["shampoo_H"][0]["W"][0])


def time_steps(cfg, batches, start, n, print_steps=False, name=""):
    """Times steps start..start+n-1; for TNT also checks each step's kind against what the
    authors' code did (inverses replaced: refresh; else statistics replaced: stats)."""
    times, loss = [], None
    for i in range(start, start + n):
        x = batches[i % len(batches)]
        before = probe(cfg["data"]) if cfg["data"] else None
        t0 = time.perf_counter()
        loss = cfg["run"](x, i)
        times.append(time.perf_counter() - t0)
        kind = step_kind(i, cfg["t1"], cfg["t2"])
        if before:
            inverses, stats = (a != b for a, b in zip(before, probe(cfg["data"])))
            seen = "refresh" if inverses else "stats" if stats else "plain"
            cfg["schedule_errors"] += seen != kind
        else:
            seen = kind
        if print_steps:
            print(
                f"  {name} step {i:>4} {kind:<8}(done: {seen:<7}){1e3 * times[-1]:>9.1f} ms"
                f"  loss {loss:.3f}"
            )
    return times, loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--authors_repo",
        required=True,
        help="The authors' utils_git directory (or the checkout that holds it).",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adam_steps", type=int, default=40)
    parser.add_argument(
        "--tnt_periods",
        type=int,
        default=0,
        help="Inverse periods per TNT window (0: 40 steps for T2=20, 100 for "
        "T2=100, i.e. whole periods of at least 40 steps).",
    )
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--statistics_decay", type=float, default=0.9)
    parser.add_argument("--adam_epsilon", type=float, default=1e-4, help="The authors' Adam.")
    parser.add_argument("--warm_start_batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--schedules",
        default="1:20,10:100",
        help="Comma-separated T1:T2 pairs of the TNT configurations.",
    )
    parser.add_argument("--print_steps", action="store_true", help="Print every timed step.")
    parser.add_argument("--output", default="", help="Optional JSON file with every step time.")
    args = parser.parse_args()
    if args.warm_start_batches < 2:
        parser.error("--warm_start_batches: at least 2 (their warm start asserts it)")

    torch.set_num_threads(args.threads)
    au = load_authors(args.authors_repo)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}, "
        f"Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; authors' files (git blob ids) {au.ids}; "
        f"stubbed unused imports: {au.stubbed or 'none'}"
    )

    rng = np.random.default_rng(0)
    init = []
    for d_in, d_out in zip(LAYERS[:-1], LAYERS[1:]):
        limit = np.sqrt(6.0 / (d_in + d_out))  # Glorot uniform; torch layout (out, in)
        init.append(rng.uniform(-limit, limit, size=(d_out, d_in)).astype(np.float32))
    np_batches = [
        rng.uniform(size=(args.batch_size, LAYERS[0])).astype(np.float32) for _ in range(4)
    ]
    batches = [torch.from_numpy(b) for b in np_batches]
    torch.manual_seed(0)

    configs = {}
    run, _ = make_authors(au, "Adam", args, init, np_batches)
    configs["adam"] = dict(run=run, data=None, steps=args.adam_steps, t1=1, t2=0)
    configs["torch_adam"] = dict(
        run=make_torch_adam(au, args, init), data=None, steps=args.adam_steps, t1=1, t2=0
    )
    for pair in args.schedules.split(","):
        t1, t2 = (int(v) for v in pair.split(":"))
        t0 = time.perf_counter()
        run, data_ = make_authors(au, "TNT", args, init, np_batches, t1, t2)
        name = f"tnt_T1={t1}_T2={t2}"
        periods = args.tnt_periods or max(1, -(-40 // t2))
        configs[name] = dict(run=run, data=data_, steps=periods * t2, t1=t1, t2=t2)
        factors = {
            tuple(m.shape[0] for m in h) for layer in data_["shampoo_H"] for h in layer.values()
        }
        print(
            f"{name}: set-up and warm start ({args.warm_start_batches} batches) "
            f"{time.perf_counter() - t0:.1f} s; {sum(len(x) for x in data_['shampoo_H'])} "
            f"tensors, factor sizes {sorted(factors)}"
        )

    for name, cfg in configs.items():
        t0 = time.perf_counter()
        cfg["schedule_errors"] = 0
        _, loss0 = time_steps(cfg, batches, 0, 1)
        _, loss = time_steps(cfg, batches, 1, 2)
        cfg["next"] = 3
        if cfg["t2"]:  # jump into the steady state: one untimed step at T2 - 1
            _, loss = time_steps(cfg, batches, cfg["t2"] - 1, 1)
            cfg["next"] = cfg["t2"]
        cfg["times"], cfg["index"], cfg["losses"] = [], [], [loss0]
        print(
            f"warm-up {name}: {time.perf_counter() - t0:.1f} s, loss {loss0:.2f} -> {loss:.2f}, "
            f"timed steps from {cfg['next']}"
        )

    for r in range(args.rounds):
        for name, cfg in configs.items():
            times, loss = time_steps(
                cfg, batches, cfg["next"], cfg["steps"], args.print_steps, name
            )
            cfg["next"] += cfg["steps"]
            cfg["times"].extend(times)
            cfg["index"].extend(range(cfg["next"] - cfg["steps"], cfg["next"]))
            cfg["losses"].append(loss)
            print(
                f"round {r + 1} {name}: {len(times)} steps, median "
                f"{1e3 * statistics.median(times):.1f} ms, mean "
                f"{1e3 * statistics.fmean(times):.1f} ms, loss {loss:.2f}"
                + (f", steps not of their kind: {cfg['schedule_errors']}" if cfg["data"] else "")
            )

    adam_med = statistics.median(configs["adam"]["times"])
    adam_mean = statistics.fmean(configs["adam"]["times"])
    torch_med = statistics.median(configs["torch_adam"]["times"])
    results = {}
    print(
        "\nsched: schedule-weighted mean of the per-kind medians (refresh step, statistics step,"
        " plain step), as benchmarks/step_time.py reports for keras_tnt; /A: against the"
        " authors' Adam (median, mean, median), sch/tA: against torch.optim.Adam's median"
    )
    print(
        f"{'config':<18}{'steps':>6}{'median':>9}{'mean':>9}{'sched':>9}{'refresh':>9}"
        f"{'stats':>9}{'plain':>9}{'med/A':>8}{'mean/A':>8}{'sch/A':>8}{'sch/tA':>8}"
    )
    for name, cfg in configs.items():
        t, t1, t2 = cfg["times"], cfg["t1"], cfg["t2"]
        kinds = {"refresh": [], "stats": [], "plain": []}
        for i, v in zip(cfg["index"], t):
            kinds[step_kind(i, t1, t2)].append(v)
        kind_med = {k: statistics.median(v) if v else float("nan") for k, v in kinds.items()}
        if t2:
            weights = {"refresh": 1 / t2, "stats": 1 / t1 - 1 / t2, "plain": 1 - 1 / t1}
        else:
            weights = {"refresh": 0.0, "stats": 0.0, "plain": 1.0}
        sched = sum(w * kind_med[k] for k, w in weights.items() if w)
        med, mean = statistics.median(t), statistics.fmean(t)
        results[name] = dict(
            steps=len(t),
            median_ms=1e3 * med,
            mean_ms=1e3 * mean,
            sched_mean_ms=1e3 * sched,
            kind_median_ms={k: 1e3 * v for k, v in kind_med.items()},
            kind_count={k: len(v) for k, v in kinds.items()},
            ratio_median=med / adam_med,
            ratio_mean=mean / adam_mean,
            ratio_sched_mean=sched / adam_med,
            ratio_sched_mean_torch_adam=sched / torch_med,
            schedule_errors=cfg["schedule_errors"],
            losses=cfg["losses"],
            step_index=cfg["index"],
            times_ms=[1e3 * v for v in t],
        )
        kms = "".join(f"{1e3 * kind_med[k]:>9.1f}" for k in ("refresh", "stats", "plain"))
        print(
            f"{name:<18}{len(t):>6}{1e3 * med:>9.1f}{1e3 * mean:>9.1f}{1e3 * sched:>9.1f}{kms}"
            f"{med / adam_med:>8.2f}{mean / adam_mean:>8.2f}{sched / adam_med:>8.2f}"
            f"{sched / torch_med:>8.2f}"
        )
    print("(times in ms)")
    errors = {n: c["schedule_errors"] for n, c in configs.items() if c["schedule_errors"]}
    if errors:
        print(f"WARNING: steps whose work did not match their kind: {errors}")

    if args.output:
        meta = dict(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            authors_files=au.ids,
            stubbed_imports=au.stubbed,
            **{k: v for k, v in vars(args).items() if k not in ("output", "print_steps")},
        )
        with open(args.output, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
