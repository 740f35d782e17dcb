"""TNT against Adam on a real (offline) data set: scikit-learn's 8x8 digits.

Trains the same small autoencoder (64-48-16-48-64, ReLU, summed binary cross-entropy on logits,
as the paper's MNIST autoencoder) with keras_tnt.TNT and with Adam, from the same initial
weights, and prints both loss curves side by side. Runs in well under a minute on a laptop CPU:

    python examples/digits.py --epochs 30
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_tnt  # noqa: E402


def build(seed: int) -> keras_tnt.FisherModel:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,))
    h = keras.layers.Dense(48, activation="relu")(inputs)
    h = keras.layers.Dense(16)(h)  # linear code layer
    h = keras.layers.Dense(48, activation="relu")(h)
    outputs = keras.layers.Dense(64)(h)  # logits
    return keras_tnt.FisherModel(inputs, outputs, fisher_seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tnt-lr", type=float, default=1e-3)
    parser.add_argument("--tnt-damping", type=float, default=0.1)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")

    x = (load_digits().data / 16.0).astype("float32")  # 1,797 real 8x8 images in [0, 1]
    loss = keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True)
    runs = {}
    for name in ("TNT", "Adam"):
        model = build(args.seed)
        if name == "TNT":
            optimizer = keras_tnt.TNT(
                learning_rate=args.tnt_lr,
                damping=args.tnt_damping,
                curvature_update_period=1,
                inverse_update_period=20,
            )
            callbacks = [keras_tnt.WarmStart(x, batch_size=args.batch_size, verbose=0)]
        else:
            optimizer = keras.optimizers.Adam(args.adam_lr)
            callbacks = []
        model.compile(optimizer=optimizer, loss=loss)
        start = time.perf_counter()
        history = model.fit(
            x, x, batch_size=args.batch_size, epochs=args.epochs, verbose=0, callbacks=callbacks
        )
        runs[name] = (history.history["loss"], time.perf_counter() - start)

    print(f"digits autoencoder, {len(x)} images, batch {args.batch_size}: training loss per epoch")
    print(f"{'epoch':>5} {'TNT':>10} {'Adam':>10}")
    for epoch in range(args.epochs):
        print(f"{epoch + 1:>5} {runs['TNT'][0][epoch]:>10.3f} {runs['Adam'][0][epoch]:>10.3f}")
    for name, (losses, seconds) in runs.items():
        print(f"{name}: final loss {losses[-1]:.3f}, best {np.min(losses):.3f}, {seconds:.1f} s")


if __name__ == "__main__":
    main()
