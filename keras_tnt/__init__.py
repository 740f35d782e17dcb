"""keras_tnt: Tensor Normal Training (Ren & Goldfarb, NeurIPS 2021) for Keras 3.

import keras, keras_tnt
model = keras_tnt.FisherModel(inputs, outputs)
model.compile(optimizer=keras_tnt.TNT(learning_rate=1e-4, damping=0.1),
              loss=keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True))
model.fit(dataset, epochs=10, callbacks=[keras_tnt.WarmStart(dataset)])
"""

from keras_tnt import kronecker
from keras_tnt import losses
from keras_tnt.fisher_model import FisherModel
from keras_tnt.fisher_model import WarmStart
from keras_tnt.kfac import KFAC
from keras_tnt.sampling import SUPPORTED_LOSSES
from keras_tnt.shampoo import Shampoo
from keras_tnt.tnt import TNT

__version__ = "0.6.0"

__all__ = [
    "FisherModel",
    "KFAC",
    "SUPPORTED_LOSSES",
    "Shampoo",
    "TNT",
    "WarmStart",
    "kronecker",
    "losses",
]
