"""Shared fixtures, and the backend selection of the suite.

The suite runs once per Keras backend (``KERAS_BACKEND=tensorflow``, the default, and
``KERAS_BACKEND=jax JAX_ENABLE_X64=1``; see tools/test.sh). A test runs on TensorFlow only unless
it (or its module, through ``pytestmark``) is marked ``@pytest.mark.backends("tensorflow",
"jax")``; the others are deselected, not skipped, on the other backend.
"""

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# Reference trajectory of the authors' implementation (see tests/data/GOLDEN.md).
GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data")

BOTH_BACKENDS = pytest.mark.backends("tensorflow", "jax")


def tensor(x, dtype="float64"):
    """A backend tensor of ``x``."""
    return keras.ops.convert_to_tensor(np.asarray(x), dtype)


def compiled(fn, jit_compile=False):
    """``fn`` (a pure function of tensors) compiled as the backend compiles a training step."""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn) if jit_compile else fn
    import tensorflow as tf

    return tf.function(fn, jit_compile=jit_compile)


def compiled_step(optimizer, variables, step):
    """``step(*args)`` (optimizer calls that assign state) compiled as a training step is.

    TensorFlow: a ``tf.function`` that assigns the variables. JAX: the stateless form Keras'
    JAX trainer runs (``optimizer.stateless_apply``'s scope) under ``jax.jit``: every value of
    ``variables`` and of the optimizer's variables goes in, the new ones come out and are
    assigned afterwards. The optimizer must be built.
    """
    if BACKEND != "jax":
        import tensorflow as tf

        return tf.function(step)
    import jax

    def pure(values, optimizer_values, *args):
        mapping = list(zip(variables, values, strict=True)) + list(
            zip(optimizer.variables, optimizer_values, strict=True)
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            step(*args)
        return (
            [scope.get_current_value(v) for v in variables],
            [scope.get_current_value(v) for v in optimizer.variables],
        )

    jitted = jax.jit(pure)

    def run(*args):
        values, optimizer_values = jitted(
            [v.value for v in variables], [v.value for v in optimizer.variables], *args
        )
        for v, value in zip(
            list(variables) + list(optimizer.variables), values + optimizer_values, strict=True
        ):
            v.assign(value)

    return run


@pytest.fixture
def float64():
    """Builds models in float64 (Keras keeps the learning rate in a floatx variable)."""
    keras.backend.clear_session()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")
    keras.backend.clear_session()


@pytest.fixture(autouse=True)
def _fresh_session():
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield


def pytest_configure(config):
    # The tests compare float32 numbers with NumPy and across devices at float32 tolerances:
    # full-precision float32 matmuls, not TensorFloat-32 (the default of TensorFlow and JAX on
    # Ampere and later GPUs, 10 mantissa bits). No effect on CPUs.
    if BACKEND == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        return
    if BACKEND != "tensorflow":
        return
    import tensorflow as tf

    # Two logical CPU devices for the MirroredStrategy tests; must happen before TF initialises.
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:
        pass
    tf.config.experimental.enable_tensor_float_32_execution(False)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("backends")
        names = marker.args if marker else ("tensorflow",)
        (keep if BACKEND in names else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ----------------------------------------------------------- tf.distribute on two CPU devices


def two_devices():
    """The names of the two logical CPU devices :func:`pytest_configure` sets up."""
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    # Fail, not skip: pytest_configure sets up two logical CPU devices before TensorFlow starts.
    assert len(devices) >= 2, f"needs 2 logical CPU devices (see conftest); found {devices}"
    return [d.name for d in devices[:2]]


def mirrored():
    """A MirroredStrategy over :func:`two_devices`.

    Reduction through one device, not collectives: TensorFlow's collective executor is
    process-wide, and a new MirroredStrategy reuses the instance keys of earlier ones (from
    other tests) with tensors of other shapes and types, which aborts the collective.
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(
        two_devices(), cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def replica_values(variable):
    """Each replica's copy of a (mirrored) variable, as NumPy arrays (one without a strategy)."""
    # A Keras variable wraps the (mirrored) tf.Variable; a raw tf.Variable is one.
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return [np.array(v) for v in getattr(value, "values", [value])]


class RecordingTargets:
    """Mixin for a ``keras_tnt.FisherModel``: keeps the last targets the Fisher pass drew in
    ``model.__dict__["_recorded"]`` (a variable no optimizer sees, set by the test), so that a
    NumPy reference sees the same draws."""

    def sample_targets(self, y_pred, seed, first_example=0):
        targets = super().sample_targets(y_pred, seed, first_example)
        self.__dict__["_recorded"].assign(keras.ops.cast(targets, "int32"))
        return targets


def free_ports(n):
    """``n`` free TCP ports on 127.0.0.1 (for multi-process tests)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_all(processes, timeout=300):
    """Return codes and outputs of ``processes``; every one is killed if they do not all end
    in time."""
    results = []
    try:
        for p in processes:
            output, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, output))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results
