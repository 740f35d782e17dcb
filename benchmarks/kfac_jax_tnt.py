r"""Step time of kfac-jax's TNT (``DenseTNT`` blocks) against an Adam step on the same model.

A reference point for ``benchmarks/step_time.py``: the TNT/Adam step-time ratio of DeepMind's
kfac-jax implementation of Tensor Normal Training (Ren & Goldfarb, 2021), measured on the MNIST
deep autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU hidden layers, linear 30-unit code,
sigmoid cross-entropy summed over the 784 outputs and averaged over the batch), batch 1000,
synthetic inputs uniform in [0, 1] (float32), written in plain JAX.

Configurations (all jitted; kfac-jax compiles its own step):

* ``adam``: ``optax.adam(1e-4)``;
* ``tnt_T1=1_T2=20`` and ``tnt_T1=10_T2=100``: ``kfac_jax.Optimizer`` with every ``dense`` layer
  tag mapped to ``kfac_jax.DenseTNT``, ``estimation_mode="fisher_gradients"`` (one target
  sampled from the model's Bernoulli outputs per example), fixed learning rate 1e-4, momentum 0.9,
  damping 0.1, ``curvature_ema=0.9``, statistics every ``T1`` steps
  (``curvature_update_period``), inverses every ``T2`` steps (``inverse_update_period``), no
  adaptive learning rate, momentum or damping, no burn-in.

Each configuration is compiled and warmed up, then the configurations alternate in rounds; a
round times ``--adam_steps`` Adam steps and a whole number of inverse periods of each TNT
configuration (``--tnt_periods`` x ``T2`` steps, so the refresh steps are inside the window), with
``jax.block_until_ready`` (on the loss and the whole optimizer state) after every step. The table
gives the median and the mean step (the refresh steps are slower, so the mean is the cost of a
long run), the median of each kind of step (inverse refresh, statistics only, plain), their
schedule-weighted mean (as ``benchmarks/step_time.py`` reports for keras_tnt) and the TNT/Adam
ratios.

This script is not part of keras_tnt and is kept out of its (test) dependencies. Run it in its
own virtual environment, outside the repository::

    python3 -m venv /work/kfacjax-venv
    /work/kfacjax-venv/bin/pip install kfac-jax==0.0.8 jax==0.9.1 jaxlib==0.9.1 optax
    /work/kfacjax-venv/bin/python benchmarks/kfac_jax_tnt.py [--rounds=3] [--output=out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax

LAYERS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
CODE_LAYER = 4  # index of the linear 30-unit code layer (output of the 4th Dense)


def init_params(key):
    params = []
    for d_in, d_out in zip(LAYERS[:-1], LAYERS[1:]):
        key, sub = jax.random.split(key)
        limit = np.sqrt(6.0 / (d_in + d_out))  # Glorot uniform, as Keras' default
        w = jax.random.uniform(sub, (d_in, d_out), jnp.float32, -limit, limit)
        params.append((w, jnp.zeros((d_out,), jnp.float32)))
    return params


def logits_fn(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i + 1 != CODE_LAYER and i + 1 != len(params):
            h = jax.nn.relu(h)
    return h


def loss_fn(params, batch, register=False):
    logits = logits_fn(params, batch)
    if register:
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, targets=batch)
    per_example = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch), axis=-1)
    return jnp.mean(per_example)


def make_adam(params, lr):
    opt = optax.adam(lr)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # kfac-jax donates its state too
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree_util.tree_map(jnp.copy, params)
    state = [params, opt.init(params)]

    def run(batch, key, i):
        del key, i
        state[0], state[1], loss = step(state[0], state[1], batch)
        return state, loss

    return run


def make_tnt(params, batch, args, t1, t2):
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(lambda p, b: loss_fn(p, b, register=True)),
        l2_reg=0.0,
        value_func_has_aux=False,
        use_adaptive_learning_rate=False,
        learning_rate_schedule=optax.constant_schedule(args.lr),
        use_adaptive_momentum=False,
        momentum_schedule=optax.constant_schedule(args.momentum),
        use_adaptive_damping=False,
        damping_schedule=optax.constant_schedule(args.damping),
        num_burnin_steps=0,
        estimation_mode="fisher_gradients",
        curvature_ema=args.curvature_ema,
        curvature_update_period=t1,
        inverse_update_period=t2,
        layer_tag_to_block_ctor={"dense": kfac_jax.DenseTNT},
        multi_device=False,
    )
    # Keep our own copy: kfac-jax donates the buffers of the params it is given.
    params = jax.tree_util.tree_map(jnp.copy, params)
    state = [params, opt.init(params, jax.random.PRNGKey(1), batch)]

    def run(batch, key, i):
        state[0], state[1], stats = opt.step(
            state[0], state[1], key, batch=batch, global_step_int=i
        )
        return state, stats["loss"]

    return run, opt


def time_steps(run, batches, keys, start, n):
    times = []
    loss = None
    for i in range(start, start + n):
        t0 = time.perf_counter()
        loss = jax.block_until_ready(run(batches[i % len(batches)], keys[i % len(keys)], i))[1]
        times.append(time.perf_counter() - t0)
    return times, float(loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--curvature_ema", type=float, default=0.9)
    parser.add_argument(
        "--schedules",
        default="1:20,10:100",
        help="Comma-separated T1:T2 pairs of the TNT configurations.",
    )
    parser.add_argument("--output", default="", help="Optional JSON file with every step time.")
    args = parser.parse_args()

    print(
        f"jax {jax.__version__}, kfac-jax {getattr(kfac_jax, '__version__', '?')}, "
        f"optax {optax.__version__}, devices {jax.devices()}, {platform.processor()}"
    )
    key = jax.random.PRNGKey(0)
    params = init_params(key)
    rng = np.random.default_rng(0)
    batches = [
        jnp.asarray(rng.uniform(size=(args.batch_size, LAYERS[0])).astype(np.float32))
        for _ in range(4)
    ]
    keys = list(jax.random.split(jax.random.PRNGKey(2), 64))

    configs = {
        "adam": dict(run=make_adam(params, args.lr), steps=args.adam_steps, warmup=5, t1=1, t2=0)
    }
    for pair in args.schedules.split(","):
        t1, t2 = (int(v) for v in pair.split(":"))
        run, opt = make_tnt(params, batches[0], args, t1, t2)
        periods = args.tnt_periods or max(1, -(-40 // t2))
        # Warm-up compiles both step variants (with and without statistics) and passes the first
        # inverse refresh; afterwards every window of whole periods holds periods refreshes.
        name = f"tnt_T1={t1}_T2={t2}"
        configs[name] = dict(run=run, steps=periods * t2, warmup=max(2 * t1 + 1, 5), t1=t1, t2=t2)
        blocks = [type(b).__name__ for b in opt._estimator.blocks]  # private, but the only handle
        print(f"{name}: {len(blocks)} curvature blocks {sorted(set(blocks))}")

    for name, cfg in configs.items():
        t0 = time.perf_counter()
        _, loss = time_steps(cfg["run"], batches, keys, 0, cfg["warmup"])
        cfg["next"] = cfg["warmup"]
        cfg["times"], cfg["index"] = [], []
        print(
            f"warm-up {name}: {cfg['warmup']} steps {time.perf_counter() - t0:.1f} s, "
            f"loss {loss:.2f}"
        )

    for r in range(args.rounds):
        for name, cfg in configs.items():
            times, loss = time_steps(cfg["run"], batches, keys, cfg["next"], cfg["steps"])
            cfg["next"] += cfg["steps"]
            cfg["times"].extend(times)
            cfg["index"].extend(range(cfg["next"] - cfg["steps"], cfg["next"]))
            print(
                f"round {r + 1} {name}: {len(times)} steps, median "
                f"{1e3 * statistics.median(times):.1f} ms, mean "
                f"{1e3 * statistics.fmean(times):.1f} ms, loss {loss:.2f}"
            )

    adam_med = statistics.median(configs["adam"]["times"])
    adam_mean = statistics.fmean(configs["adam"]["times"])
    results = {}
    print(
        "\nsched-mean: schedule-weighted mean of the per-kind medians (refresh step, statistics"
        " step, plain step), as benchmarks/step_time.py reports for keras_tnt"
    )
    print(
        f"{'config':<18}{'steps':>6}{'median':>9}{'mean':>9}{'sched':>9}{'refresh':>9}"
        f"{'stats':>9}{'plain':>9}{'med/Adam':>10}{'mean/Adam':>10}{'sch/Adam':>9}"
    )
    for name, cfg in configs.items():
        t, t1, t2 = cfg["times"], cfg["t1"], cfg["t2"]
        kinds = {"refresh": [], "stats": [], "plain": []}
        for i, v in zip(cfg["index"], t):
            kind = "refresh" if t2 and i % t2 == 0 else "stats" if t2 and i % t1 == 0 else "plain"
            kinds[kind].append(v)
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
            times_ms=[1e3 * v for v in t],
        )
        kms = "".join(f"{1e3 * kind_med[k]:>9.1f}" for k in ("refresh", "stats", "plain"))
        print(
            f"{name:<18}{len(t):>6}{1e3 * med:>9.1f}{1e3 * mean:>9.1f}{1e3 * sched:>9.1f}{kms}"
            f"{med / adam_med:>10.2f}{mean / adam_mean:>10.2f}{sched / adam_med:>9.2f}"
        )
    print("(times in ms; TNT/Adam ratios against Adam's median, mean and median)")

    if args.output:
        meta = dict(
            jax=jax.__version__,
            optax=optax.__version__,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            damping=args.damping,
            curvature_ema=args.curvature_ema,
            rounds=args.rounds,
        )
        with open(args.output, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
