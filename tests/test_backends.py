"""keras_tnt on Keras' JAX backend, and against its TensorFlow backend.

The cross-backend tests run each backend in its own subprocess (tests/backend_worker.py); they
are collected in the TensorFlow session only. The in-process tests marked for JAX run in the
JAX session (``KERAS_BACKEND=jax JAX_ENABLE_X64=1``, see tools/test.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_tnt
from tests.conftest import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(backend, *args, timeout=600, **extra_env):
    """tests/backend_worker.py on ``backend``: in this process when it is this session's backend
    (a subprocess would only add TensorFlow's import), else in a subprocess."""
    if backend == keras.backend.backend() and not extra_env:
        from tests import backend_worker

        backend_worker.main([str(a) for a in args])
        return
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT, **extra_env)
    env.pop("JAX_ENABLE_X64", None)
    result = subprocess.run(
        [sys.executable, "-m", "tests.backend_worker", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _digits_curve(tmp_path, backend, seed, optimizer="tnt", epochs=4):
    out = tmp_path / f"{backend}_{seed}_{optimizer}.json"
    _worker(backend, "digits", out, "--seed", seed, "--epochs", epochs, optimizer)
    return json.loads(out.read_text())


def test_digits_run_on_jax_matches_tensorflow(tmp_path):
    """The same TNT run (weights, data order and Fisher draws) on both backends: the loss
    curves agree to float32 round-off, far inside the sampling noise (another seed's curve)."""
    tf_run = _digits_curve(tmp_path, "tensorflow", 0)
    jax_run = _digits_curve(tmp_path, "jax", 0)
    other = _digits_curve(tmp_path, "tensorflow", 1)
    assert not jax_run["tensorflow"], "importing keras_tnt on JAX imported TensorFlow"
    tf_loss, jax_loss, other_loss = (np.array(r["loss"]) for r in (tf_run, jax_run, other))
    assert tf_loss[-1] < 0.7 * tf_loss[0]  # it trains
    backends_gap = np.max(np.abs(jax_loss - tf_loss) / tf_loss)
    seeds_gap = np.max(np.abs(other_loss - tf_loss) / tf_loss)
    print(f"relative gap per epoch: backends {backends_gap:.1e}, seeds {seeds_gap:.1e}")
    assert backends_gap <= 1e-4
    assert seeds_gap > 100 * backends_gap


def test_kfac_conv_run_on_jax_matches_tensorflow(tmp_path):
    """KFAC on JAX (pre-activation gradients through zero offsets; im2col by keras.ops) on a
    Conv2D + Dense classifier: the loss curve of the TensorFlow run (whose factors are tested
    against NumPy in test_kfac.py) to float32 round-off."""
    tf_loss = np.array(_digits_curve(tmp_path, "tensorflow", 0, "kfac-conv", epochs=3)["loss"])
    jax_loss = np.array(_digits_curve(tmp_path, "jax", 0, "kfac-conv", epochs=3)["loss"])
    assert tf_loss[-1] < 0.7 * tf_loss[0]
    np.testing.assert_allclose(jax_loss, tf_loss, rtol=1e-4)


@pytest.mark.parametrize("save_on,load_on", [("tensorflow", "jax"), ("jax", "tensorflow")])
def test_keras_file_saved_on_one_backend_continues_on_the_other(tmp_path, save_on, load_on):
    path = tmp_path / "model.keras"
    _worker(save_on, "save", path, tmp_path / "saved.npz")
    _worker(load_on, "resume", path, tmp_path / "loaded.npz")
    saved, loaded = np.load(tmp_path / "saved.npz"), np.load(tmp_path / "loaded.npz")
    assert sorted(saved.files) == sorted(loaded.files)
    slots = [k for k in saved.files if k.startswith("opt/")]
    assert len(slots) > 20  # momentum, statistics, inverses, counters of 8 tensors
    for key in slots + [k for k in saved.files if k.startswith("w/")]:
        np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)
    # The next step from the restored state: the same numbers up to float32 round-off.
    for key in (k for k in saved.files if k.startswith("next/")):
        scale = max(np.max(np.abs(saved[key])), 1.0)
        assert np.max(np.abs(loaded[key] - saved[key])) <= 1e-5 * scale, key
    np.testing.assert_allclose(loaded["loss"], saved["loss"], rtol=1e-5)


# ------------------------------------------------------------------- JAX, in process

jax_only = pytest.mark.backends("jax")


def _classifier(seed=0):
    # sigmoid: Keras 3.15's tanh computes in float32 on JAX even for float64 inputs.
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="sigmoid")(inputs)
    h = keras.layers.Dense(4, activation="sigmoid")(h)
    outputs = keras.layers.Dense(3)(h)
    return keras_tnt.FisherModel(inputs, outputs, fisher_seed=seed)


@jax_only
def test_jax_draws_are_the_same_with_and_without_jit():
    import jax

    from keras_tnt.sampling import resolve_sampler

    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.standard_normal((64, 10)), "float32")
    seed = jax.numpy.asarray([7, 0, 3, 0], "int32")
    for loss in ("sparse_categorical_crossentropy", "binary_crossentropy", "mse"):
        sampler = resolve_sampler(keras.losses.get(loss))
        eager = np.asarray(sampler.sample(logits, seed))
        jitted = np.asarray(jax.jit(sampler.sample)(logits, seed))
        if loss == "mse":
            # Gaussian: the same uniforms through log/cos, which XLA compiles with other
            # float32 roundings (TensorFlow's stateless ops differ by up to 0.98 instead).
            np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5, err_msg=loss)
        else:  # the same uniforms, compared: identical labels
            np.testing.assert_array_equal(eager, jitted, err_msg=loss)


def _dot_counts(jaxpr):
    """(dot_generals outside any cond, [dot_generals inside each top-level cond])."""
    import jax

    outside, conds = 0, []

    def walk(jaxpr, inside):
        nonlocal outside
        count = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                count += 1
            subs = [
                v.jaxpr if hasattr(v, "jaxpr") else v
                for p in eqn.params.values()
                for v in (p if isinstance(p, (list, tuple)) else [p])
                if isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))
            ]
            if eqn.primitive.name == "cond" and not inside:
                conds.append(max(walk(s, True) for s in subs))
            else:
                count += sum(walk(s, inside) for s in subs)
        return count

    outside = walk(jaxpr.jaxpr, False)
    return outside, conds


@jax_only
def test_jax_step_has_one_forward_pass_and_the_fisher_pass_under_a_cond():
    """In the compiled step of a 3-layer Dense model: forward (3 matmuls), ordinary backward
    (5) and the preconditioned directions (one matmul per mode) outside any cond; the
    sampled-label backward pass (5) only inside one."""
    import jax

    model = _classifier()
    model.compile(
        optimizer=keras_tnt.TNT(learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.random.default_rng(1).standard_normal((8, 6)).astype("float32")
    y = np.arange(8) % 3
    model.train_on_batch(x, y)  # builds everything
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    jaxpr = jax.make_jaxpr(model.train_step)(state, (x, y))
    outside, conds = _dot_counts(jaxpr)
    directions = sum(len(entry["modes"]) for entry in model.optimizer.plan())
    assert directions == 3 * 2 + 3  # kernels: 2 modes, biases: 1
    assert outside == 3 + 5 + directions
    assert 5 in conds  # the Fisher pass: its own cond, with exactly the backward pass
    assert conds.count(5) == 1


@jax_only
def test_jax_fit_matches_a_stateless_reference_step():
    """Two fit steps on JAX equal the same steps done by hand (the Fisher gradient from
    jax.grad of the sampled loss, then update_curvature and apply)."""
    import jax

    x = np.random.default_rng(2).standard_normal((16, 6)).astype("float64")
    y = np.arange(16) % 3
    keras.config.set_floatx("float64")
    try:
        model, ref = _classifier(3), _classifier(3)
        ref.set_weights(model.get_weights())
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        kw = dict(learning_rate=0.0625, damping=0.25, inverse_update_period=1)
        model.compile(optimizer=keras_tnt.TNT(**kw), loss=loss)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

        ref.compile(optimizer=keras_tnt.TNT(**kw), loss=loss)
        ref.build_optimizer()
        opt = ref.optimizer
        weights = ref.trainable_variables
        for step in range(2):
            xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
            seed = jax.numpy.asarray([3, 0, step], "int64")  # fisher_seed, stream, step
            targets = ref.sample_targets(ref(xb), seed)

            def loss_at(values, labels):
                out, _ = ref.stateless_call(values, [], xb)
                return loss(labels, out)

            values = [w.value for w in weights]
            fisher = jax.grad(loss_at)(values, targets)
            grads = jax.grad(loss_at)(values, yb)
            opt.update_curvature(fisher)
            opt.apply(grads, weights)
        for a, b in zip(model.get_weights(), ref.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert model.optimizer.curvature_updates == opt.curvature_updates == 2
    finally:
        keras.config.set_floatx("float32")


def test_backend_module_is_the_active_one():
    from keras_tnt import backend

    assert backend.NAME == BACKEND
    assert backend.FisherTrainer.__module__ == f"keras_tnt.backend.{BACKEND}"


test_backend_module_is_the_active_one = pytest.mark.backends("tensorflow", "jax")(
    test_backend_module_is_the_active_one
)


def test_train_py_on_jax_resumes_exactly(tmp_path):
    """train.py on JAX (one subprocess, the three launches in it): 1 epoch, then started again
    for 2, resumes from the checkpoint (it says so, with the step counter it loaded, and does
    not warm-start again: a fresh start of this seeded run would end equal too) and ends with
    every weight and optimizer variable bit-identical to 2 uninterrupted epochs (statistics,
    step counter, draws and data order intact). The largest seed works on JAX's int32 seeds."""
    out = tmp_path / "states.npz"
    _worker(
        "jax",
        "train_py_resume",
        tmp_path,
        out,
        "--steps_per_epoch=3",
        f"--seed={2**31 - 1}",
        "--verbose=0",
    )
    r = np.load(out)
    for launch in ("straight", "resumed_1"):
        assert "Warm start" in str(r[f"printed/{launch}"])
    resumed = str(r["printed/resumed_2"])
    assert "Warm start" not in resumed
    checkpoint = tmp_path / "resumed" / "checkpoint-00001.keras"
    assert f"Resuming from {checkpoint} after step 3 (end of epoch 1)" in resumed
    assert int(r["steps/straight"]) == int(r["steps/resumed"]) == 6
    straight = sorted(k.split("/")[1] for k in r.files if k.startswith("straight/"))
    assert straight == sorted(k.split("/")[1] for k in r.files if k.startswith("resumed/"))
    # 8 weights, the step counter, 8 momenta, the factor buffers (sizes 64, 48, 16), counters.
    assert len(straight) > 25
    for i in straight:
        np.testing.assert_array_equal(r[f"straight/{i}"], r[f"resumed/{i}"], err_msg=i)


def test_jax_data_parallel_on_two_devices_is_the_single_device_run(tmp_path):
    """keras.distribution.DataParallel on two CPU devices: the global batch is sharded, the
    optimizer state replicated on both devices, and (the draws depend on the example's position
    in the global batch, not on the device) the run is the single-device run, to float64
    reduction-order round-off. Fails, not skips, when the two devices cannot be set up."""
    out = tmp_path / "dp.npz"
    _worker(
        "jax",
        "data_parallel",
        out,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    r = np.load(out)
    assert set(r["devices"]) == {2}  # every optimizer variable lives on both devices
    single = sorted((k for k in r.files if k.startswith("single/")), key=lambda k: k.split("/")[1])
    assert len(single) > 25  # weights, the step counter, momenta, factor buffers, counts...
    assert r["single/loss"][-1] < 0.7 * r["single/loss"][0]
    for key in single:
        a, b = r[key].astype(float), r["parallel/" + key.split("/", 1)[1]].astype(float)
        scale = max(np.max(np.abs(a)), 1e-30)
        assert r[key].dtype == np.float64 or "int" in str(r[key].dtype), key
        assert np.max(np.abs(a - b)) <= 1e-10 * scale, key


def test_jax_split_across_two_devices_is_the_unsplit_run_bit_for_bit(tmp_path):
    """Under keras.distribution.DataParallel on two CPU devices the preconditioner work is split
    (jax.shard_map: each device computes the units it owns, one psum shares them): TNT (also
    with row-sparse tensors), Shampoo and KFAC end bit for bit where the unsplit run ends,
    equal to one device to 1e-10, and each device's replica_work() shows its share of what one
    device does alone."""
    out = tmp_path / "split.npz"
    _worker(
        "jax",
        "data_parallel_split",
        out,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    r = np.load(out)
    for name in ("tnt", "tnt_rs", "shampoo", "kfac"):
        keys = sorted(k.split("/")[2] for k in r.files if k.startswith(f"{name}/split/"))
        keys.remove("work")
        assert len(keys) > 20, name
        for key in keys:
            split, unsplit = r[f"{name}/split/{key}"], r[f"{name}/unsplit/{key}"]
            np.testing.assert_array_equal(split, unsplit, err_msg=f"{name} {key}")
            single = r[f"{name}/single/{key}"].astype(float)
            scale = max(np.max(np.abs(single)), 1e-30)
            assert np.max(np.abs(single - split.astype(float))) <= 1e-10 * scale, (name, key)
        work = r[f"{name}/split/work"]
        assert work.shape == (2, 3), (name, work)
        assert np.all(r[f"{name}/unsplit/work"] == 0), name
        # Both devices did some of every kind of work (KFAC has no contractions to split).
        kinds = [0, 2] if name == "kfac" else [0, 1, 2]
        assert np.all(work[:, kinds] > 0), (name, work)
        steps = int(r[f"{name}/steps"])
        if name == "kfac":
            layers = 4
            refreshes = sum(1 for t in range(steps) if t % (1 if t < 4 else 4) == 0)
            expected = [2 * layers * refreshes, 0, layers * steps]
        else:
            tensors, modes = 8, 2 * 4 + 4  # 4 kernels of 2 modes, 4 biases of 1
            refreshes = sum(1 for t in range(steps) if t % (1 if t < 4 else 4) == 0)
            updates = int(r[f"{name}/curvature_updates"])
            expected = [modes * refreshes, tensors * updates, tensors * steps]
        assert list(work.sum(axis=0)) == expected, (name, work)
