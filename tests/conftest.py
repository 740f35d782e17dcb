import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Reference trajectory of the authors' implementation (see tests/data/GOLDEN.md).
GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data")


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
    # Two logical CPU devices for the MirroredStrategy tests; must happen before TF initialises.
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:
        pass
