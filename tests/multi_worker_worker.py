"""One worker of tests/test_multi_worker.py (or the single-process reference without TF_CONFIG).

python -m tests.multi_worker_worker OUT CHECKPOINT_DIR OPTIMIZERS EPOCHS [KILL_AT_STEP]

For each optimizer of the comma-separated OPTIMIZERS (keys of OPTIMIZERS below), one after the
other in the same cluster: trains a float64 digits autoencoder (330 images, global batch 80: four
full batches and a partial one of 10) with keras_tnt.multi_worker.DistributedTrainer, warm start
included, checkpointing to CHECKPOINT_DIR/NAME, and saves every optimizer variable and weight of
its replica to OUT_NAME.npz. With KILL_AT_STEP, the worker with task index 1 SIGKILLs itself
after that many steps (counted over the whole run). Prints, per optimizer, where it starts:
"NAME: resuming from PATH after step N (step S of epoch E)" (the step counter of the loaded
optimizer) or "NAME: fresh start".
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_tnt  # noqa: E402
from keras_tnt import multi_worker  # noqa: E402

OPTIMIZERS = {
    "tnt": lambda: keras_tnt.TNT(learning_rate=1e-3, damping=0.1, inverse_update_period=3),
    "tnt_unsplit": lambda: keras_tnt.TNT(
        learning_rate=1e-3, damping=0.1, inverse_update_period=3, split_preconditioner=False
    ),
    "shampoo": lambda: keras_tnt.Shampoo(learning_rate=1e-3, damping=1e-3, inverse_update_period=3),
    "kfac": lambda: keras_tnt.KFAC(learning_rate=1e-3, damping=0.3, inverse_update_period=3),
}


def build(optimizer):
    inputs = keras.Input((64,), dtype="float64")
    h = keras.layers.Dense(24, activation="tanh", dtype="float64")(inputs)
    h = keras.layers.Dense(8, dtype="float64")(h)
    h = keras.layers.Dense(24, activation="tanh", dtype="float64")(h)
    outputs = keras.layers.Dense(64, dtype="float64")(h)
    model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=5)
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(-0.4, 0.4, w.shape) for w in model.get_weights()])
    model.compile(
        optimizer=OPTIMIZERS[optimizer](),
        loss=keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True),
    )
    return model


class KillAt(keras.callbacks.Callback):
    def __init__(self, trainer, step):
        super().__init__()
        self.trainer, self.step = trainer, step

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.state["steps"] >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out, checkpoint_dir, optimizers, epochs, kill_at=None):
    # The shuffles' seeds combine with TensorFlow's global seed: fix it, so that a run in a
    # fresh process and one in a test process that set another seed see the same order.
    keras.utils.set_random_seed(0)
    if os.environ.get("TF_CONFIG"):
        timeout = float(os.environ.get("CONNECT_TIMEOUT", "120"))
        strategy = multi_worker.strategy_from_tf_config(timeout=timeout)
    else:
        strategy = tf.distribute.get_strategy()
    for optimizer in optimizers.split(","):
        train(
            strategy,
            f"{out}_{optimizer}.npz",
            os.path.join(checkpoint_dir, optimizer),
            optimizer,
            epochs,
            kill_at,
        )


def train(strategy, out, checkpoint_dir, optimizer, epochs, kill_at):
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0)[:330]
    with strategy.scope():
        model = build(optimizer)
    trainer = multi_worker.DistributedTrainer(
        model, strategy, checkpoint_dir, checkpoint_every_steps=2
    )

    def dataset(epoch):
        data = tf.data.Dataset.from_tensor_slices((x, x))
        return data.shuffle(330, seed=epoch, reshuffle_each_iteration=False).batch(80)

    name = os.path.basename(checkpoint_dir)
    if trainer.restored_from:
        steps = int(trainer.model.optimizer.iterations.numpy())
        epoch, step_in_epoch = trainer.state["epoch"], trainer.state["step_in_epoch"]
        print(
            f"{name}: resuming from {trainer.restored_from} after step {steps} "
            f"(step {step_in_epoch} of epoch {epoch + 1})",
            flush=True,
        )
    else:
        print(f"{name}: fresh start", flush=True)
    callbacks = []
    task = multi_worker.parse_tf_config()["task"] if os.environ.get("TF_CONFIG") else None
    if kill_at is not None and task and task["index"] == 1:
        callbacks.append(KillAt(trainer, int(kill_at)))
    trainer.fit(
        dataset,
        epochs=int(epochs),
        callbacks=callbacks,
        verbose=0,
        warm_start_fn=lambda: tf.data.Dataset.from_tensor_slices((x, x)).batch(80),
    )
    model = trainer.model
    values = [np.array(v) for v in model.optimizer.variables + model.weights]
    np.savez(out, *values, steps=trainer.state["steps"], work=str(model.optimizer.replica_work()))


if __name__ == "__main__":
    main(*sys.argv[1:])
