"""Runs in a subprocess with a chosen KERAS_BACKEND for tests/test_backends.py.

python -m tests.backend_worker digits OUT.json --seed 0 --epochs 4
python -m tests.backend_worker save MODEL.keras OUT.npz
python -m tests.backend_worker resume MODEL.keras OUT.npz
python -m tests.backend_worker data_parallel OUT.npz   # JAX, two devices (XLA_FLAGS)
python -m tests.backend_worker data_parallel_split OUT.npz   # JAX, two devices (XLA_FLAGS)
python -m tests.backend_worker train_py_resume RUNS_DIR OUT.npz [TRAIN.PY FLAGS...]
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tnt  # noqa: E402

IMPORTED_TENSORFLOW = "tensorflow" in sys.modules  # right after `import keras_tnt`


def digits():
    from sklearn.datasets import load_digits

    return (load_digits().data / 16.0).astype("float32")


def autoencoder(seed: int) -> keras_tnt.FisherModel:
    """examples/digits.py's model, with weights drawn by NumPy (the same on every backend)."""
    inputs = keras.Input((64,))
    h = keras.layers.Dense(48, activation="relu")(inputs)
    h = keras.layers.Dense(16)(h)
    h = keras.layers.Dense(48, activation="relu")(h)
    outputs = keras.layers.Dense(64)(h)
    model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=seed)
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.uniform(-1, 1, w.shape) * np.sqrt(6 / sum(w.shape)) for w in model.get_weights()]
    )
    return model


def compile_tnt(model, optimizer="tnt"):
    optimizers = {
        "tnt": lambda: keras_tnt.TNT(learning_rate=1e-3, damping=0.1, inverse_update_period=20),
        "kfac": lambda: keras_tnt.KFAC(learning_rate=1e-3, damping=0.3, inverse_update_period=20),
    }
    model.compile(
        optimizer=optimizers[optimizer](),
        loss=keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True),
    )


def conv_classifier(seed: int) -> keras_tnt.FisherModel:
    """A small Conv2D (3x3, stride 1, then 2) + Dense classifier of the 8x8 digits."""
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(10)(h)
    model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=seed)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in model.get_weights()])
    return model


def run_digits(out, seed, epochs, optimizer="tnt"):
    x = digits()
    if optimizer == "kfac-conv":
        from sklearn.datasets import load_digits

        y = load_digits().target
        model = conv_classifier(seed)
        model.compile(
            optimizer=keras_tnt.KFAC(learning_rate=3e-3, damping=0.1, inverse_update_period=20),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x = x.reshape(-1, 8, 8, 1)
    else:
        y = x
        model = autoencoder(seed)
        compile_tnt(model, optimizer)
    history = model.fit(
        x,
        y,
        batch_size=100,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[keras_tnt.WarmStart(x, batch_size=100, verbose=0)],
    )
    with open(out, "w") as f:
        json.dump({"loss": history.history["loss"], "tensorflow": IMPORTED_TENSORFLOW}, f)


def state(model):
    """Every optimizer variable, the weights and the loss of one more step."""
    return {
        **{f"opt/{i}/{v.path}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)},
        **{f"w/{i}": np.asarray(w) for i, w in enumerate(model.get_weights())},
    }


def save(path, out):
    x = digits()[:400]
    model = autoencoder(1)
    compile_tnt(model)
    model.fit(x, x, batch_size=100, epochs=2, shuffle=False, verbose=0)
    model.save(path)
    before = state(model)
    logs = model.train_on_batch(x[:100], x[:100], return_dict=True)
    np.savez(out, loss=logs["loss"], **before, **{f"next/{k}": v for k, v in state(model).items()})


def resume(path, out):
    x = digits()[:400]
    model = keras.models.load_model(path)
    loaded = state(model)
    logs = model.train_on_batch(x[:100], x[:100], return_dict=True)
    np.savez(out, loss=logs["loss"], **loaded, **{f"next/{k}": v for k, v in state(model).items()})


def data_parallel(out):
    """The same TNT run on one device and under keras.distribution.DataParallel on two, in
    float64 (in float32 the two runs' reduction orders differ and 24 second-order steps amplify
    that past 1e-5 of some tensors' scale, depending on the XLA version)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    keras.config.set_floatx("float64")
    devices = jax.devices()
    if len(devices) != 2:
        raise SystemExit(f"expected 2 devices (XLA_FLAGS), got {devices}")
    x = digits()[:800].astype("float64")
    results = {}
    for name, distribution in [
        ("single", None),
        ("parallel", keras.distribution.DataParallel(devices=devices)),
    ]:
        keras.distribution.set_distribution(distribution)
        model = autoencoder(3)
        compile_tnt(model)
        history = model.fit(
            x,
            x,
            batch_size=100,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[keras_tnt.WarmStart(x, batch_size=100, verbose=0)],
        )
        results[f"{name}/loss"] = np.array(history.history["loss"])
        for i, value in enumerate(model.optimizer.variables + model.weights):
            results[f"{name}/{i}"] = np.asarray(value)
        if distribution is not None:
            shardings = {str(v.value.sharding) for v in model.optimizer.variables}
            results["devices"] = np.array(
                [len(v.value.sharding.device_set) for v in model.optimizer.variables]
            )
            print("optimizer variable shardings:", shardings)
    keras.distribution.set_distribution(None)
    np.savez(out, **results)


def data_parallel_split(out):
    """TNT, Shampoo and KFAC under keras.distribution.DataParallel on two devices, float64,
    with the preconditioner work split across the devices and not; and on one device. Saves
    every state and each split run's ``replica_work()``."""
    import jax

    jax.config.update("jax_enable_x64", True)
    keras.config.set_floatx("float64")
    devices = jax.devices()
    if len(devices) != 2:
        raise SystemExit(f"expected 2 devices (XLA_FLAGS), got {devices}")
    x = digits()[:400].astype("float64")
    makers = {
        "tnt": lambda split: keras_tnt.TNT(
            learning_rate=1e-3,
            damping=0.1,
            inverse_update_period=4,
            weight_decay=1e-3,
            split_preconditioner=split,
        ),
        # Every kernel with a diagonal mode, three of them row-sparse (first mode diagonal).
        "tnt_rs": lambda split: keras_tnt.TNT(
            learning_rate=1e-3,
            damping=0.1,
            inverse_update_period=4,
            weight_decay=1e-3,
            max_factor_dim=40,
            split_preconditioner=split,
        ),
        "shampoo": lambda split: keras_tnt.Shampoo(
            learning_rate=1e-3, damping=1e-3, inverse_update_period=4, split_preconditioner=split
        ),
        "kfac": lambda split: keras_tnt.KFAC(
            learning_rate=1e-3, damping=0.3, inverse_update_period=4, split_preconditioner=split
        ),
    }
    results = {}
    for name, make in makers.items():
        for run, distribution, split in [
            ("single", None, None),
            ("split", keras.distribution.DataParallel(devices=devices), None),
            ("unsplit", keras.distribution.DataParallel(devices=devices), False),
        ]:
            keras.distribution.set_distribution(distribution)
            model = autoencoder(3)
            model.compile(
                optimizer=make(split),
                loss=keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True),
            )
            model.fit(
                x,
                x,
                batch_size=100,
                epochs=2,
                shuffle=False,
                verbose=0,
                callbacks=[keras_tnt.WarmStart((x, x), batch_size=100, verbose=0)],
            )
            for i, value in enumerate(model.optimizer.variables + model.weights):
                results[f"{name}/{run}/{i:03d}"] = np.asarray(value)
            work = model.optimizer.replica_work()
            results[f"{name}/{run}/work"] = np.array(
                [
                    [w[k] for k in ("factorizations", "contractions", "preconditionings")]
                    for w in work
                ]
            ).reshape(-1, 3)
            results[f"{name}/steps"] = int(model.optimizer.iterations.numpy())
            results[f"{name}/curvature_updates"] = model.optimizer.curvature_updates
    keras.distribution.set_distribution(None)
    np.savez(out, **results)


def train_py_resume(runs_dir, out, *flags):
    """train.py (in this process, so one import of each framework): ``straight`` runs 2 epochs;
    ``resumed`` runs 1, then is started again for 2. Saves, per run, what its last checkpoint
    holds (weights, then optimizer variables, as loaded) and what each launch printed."""
    import contextlib
    import io

    import train

    def launch(name, epochs):
        train.FLAGS.unparse_flags()
        train.FLAGS(["train.py", f"--epochs={epochs}", f"--output_dir={runs_dir}/{name}", *flags])
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                train.run(train.resolve_config())
        finally:
            train.FLAGS.unparse_flags()
        return printed.getvalue()

    results = {
        "printed/straight": launch("straight", 2),
        "printed/resumed_1": launch("resumed", 1),
        "printed/resumed_2": launch("resumed", 2),
    }
    for name in ("straight", "resumed"):
        with open(f"{runs_dir}/{name}/state.json") as f:
            saved = json.load(f)
        model = keras.models.load_model(f"{runs_dir}/{name}/{saved['checkpoint']}")
        values = list(model.weights) + list(model.optimizer.variables)
        for i, value in enumerate(values):
            results[f"{name}/{i:03d}"] = np.asarray(value)
        results[f"steps/{name}"] = saved["steps"]
    np.savez(out, **results)


def main(argv):
    task, *args = argv
    if task == "digits":
        run_digits(
            args[0], seed=int(args[2]), epochs=int(args[4]), optimizer=(args[5:] or ["tnt"])[0]
        )
    elif task == "save":
        save(*args)
    elif task == "resume":
        resume(*args)
    elif task == "data_parallel":
        data_parallel(*args)
    elif task == "data_parallel_split":
        data_parallel_split(*args)
    elif task == "train_py_resume":
        train_py_resume(*args)
    else:
        raise SystemExit(f"unknown task {task!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
