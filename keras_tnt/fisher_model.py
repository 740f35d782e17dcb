"""`FisherModel`: a `keras.Model` whose training step also feeds the optimizer's Fisher statistics.

Each step makes ONE forward pass. The ordinary gradient ``g`` of the compiled loss goes to
``optimizer.apply`` as in Keras. On steps where the optimizer wants statistics
(``optimizer.curvature_due()``), targets are drawn from the model's predictive distribution
(:mod:`keras_tnt.sampling`) and a second backward pass from the same forward pass gives the
sampled-label gradient ``Ĝ``, which goes to ``optimizer.update_curvature``. On other steps there is
no second backward pass.

What is shared by every backend lives here (configuration, checks, target drawing, which
variables or layers get statistics, the warm-start loop); the training step itself is the
backend's ``FisherTrainer`` (:mod:`keras_tnt.backend`), as Keras' own trainers are.
"""

from __future__ import annotations

import random

import keras
from keras import ops

from keras_tnt import backend
from keras_tnt._layers import kernel_variable
from keras_tnt.sampling import TargetSampler
from keras_tnt.sampling import resolve_sampler


@keras.saving.register_keras_serializable(package="keras_tnt")
class FisherModel(backend.FisherTrainer, keras.Model):
    """A Keras model trained with the Fisher (sampled-label) pass that TNT needs.

    Build it like a functional model, ``FisherModel(inputs, outputs)``, or wrap an existing
    Sequential/functional model with :meth:`from_model`. Compiled with an optimizer that has no
    ``update_curvature`` (Adam, SGD, ...) it trains exactly like ``keras.Model``.

    Args:
        fisher_seed: seed of the target draws (an int; drawn from Python's ``random``, which
            ``keras.utils.set_random_seed`` seeds, when omitted). Step ``t`` draws with
            ``(fisher_seed, t)``, so a resumed run draws what an uninterrupted one would.
        *args, **kwargs: as for ``keras.Model``.
    """

    def __init__(self, *args, fisher_seed: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if fisher_seed is None:
            fisher_seed = random.randrange(2**31 - 1)
        if isinstance(fisher_seed, bool) or not isinstance(fisher_seed, int):
            raise TypeError(f"`fisher_seed` must be an int; received fisher_seed={fisher_seed!r}.")
        self.fisher_seed = fisher_seed
        self._sampler: TargetSampler | None = None

    @classmethod
    def from_model(cls, model: keras.Model, fisher_seed: int | None = None) -> FisherModel:
        """A FisherModel sharing the layers (and weights) of a built Sequential/functional model."""
        if isinstance(model, FisherModel):
            return model
        inputs = getattr(model, "inputs", None)
        outputs = getattr(model, "outputs", None)
        if not inputs or not outputs:
            raise ValueError(
                "FisherModel.from_model needs a model with known inputs and outputs; "
                f"{model.name!r} "
                "has none. Give it an input shape first (e.g. `keras.Input(shape)` as the first "
                "layer of a Sequential model) or build it as a functional model."
            )
        return cls(inputs=inputs, outputs=outputs, name=model.name, fisher_seed=fisher_seed)

    # ---------------------------------------------------------------- config

    # Properties that return the compiled optimizer: Keras' saving walks `dir(model)`, and would
    # save (and load) the optimizer's state a second time under these names.
    _NOT_SAVED = frozenset({"curvature_optimizer", "statistics_optimizer"})

    def __dir__(self):
        return [name for name in super().__dir__() if name not in self._NOT_SAVED]

    def get_config(self):
        config = super().get_config()
        config["fisher_seed"] = self.fisher_seed
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        seed = config.pop("fisher_seed", None)
        model = super().from_config(config, custom_objects=custom_objects)
        if seed is not None:
            model.fisher_seed = int(seed)
        return model

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        self._sampler = None
        self._warm_start_function = None
        optimizer = self.curvature_optimizer
        if optimizer is None:
            return
        outputs = getattr(self, "outputs", None) or []
        if len(outputs) > 1:
            raise ValueError(
                f"{type(optimizer).__name__} needs a single-output model: the Fisher pass draws "
                f"targets from one predictive distribution, and this model has {len(outputs)} "
                "outputs. Build a model with one output (concatenate heads into one tensor with "
                "one loss) or use a first-order optimizer."
            )
        self._sampler = resolve_sampler(self.loss)
        if hasattr(optimizer, "register_layers"):
            optimizer.register_layers(self)
        optimizer.mark_curvature_source()

    def get_compile_config(self):
        return super().get_compile_config()

    def build_optimizer(self):
        """Builds the compiled optimizer on the trainable variables, if it is not built yet.

        Keras builds it lazily, inside the first traced training step; building it now restores
        a state loaded into it before (``load_weights``), and lets a mismatch fail here.
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built and self.built:
            with self._build_scope():
                optimizer.build(self.trainable_variables)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """As ``keras.Model.load_weights``; the optimizer is built first, so that its saved state
        is restored (or refused, unless ``skip_mismatch``) now, not at the first step."""
        self.build_optimizer()
        return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def compile_from_config(self, config):
        # Keras skips compiling on load when `compile` is overridden; ours only adds checks.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def curvature_optimizer(self):
        """The compiled optimizer if it needs sampled-label statistics (unwrapping loss scaling).

        None for first-order optimizers and for ones that take their statistics from the
        ordinary gradients (``TNT(empirical_fisher=True)``): those train with Keras' own step.
        """
        optimizer = getattr(self, "optimizer", None)
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if not hasattr(optimizer, "update_curvature"):
            return None
        return optimizer if getattr(optimizer, "needs_sampled_gradients", True) else None

    @property
    def statistics_optimizer(self):
        """The compiled optimizer if it keeps Kronecker statistics at all (sampled or not)."""
        optimizer = getattr(self, "optimizer", None)
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        return optimizer if hasattr(optimizer, "update_curvature") else None

    # ---------------------------------------------------------------- Fisher

    def sample_targets(self, y_pred, seed, first_example=0):
        """Targets drawn from the model's predictive distribution at ``y_pred`` (no gradient).

        ``seed`` is a 1-D integer tensor (model seed, stream, step); the draws are a pure
        function of it and of each example's position in the global batch, whose examples
        ``first_example, ...`` ``y_pred`` holds (a replica's slice; 0 on one device). So one
        device and R replicas draw the same targets. Override to feed recorded targets (the
        golden-trajectory test does).
        """
        return self._sampler.sample(y_pred, seed, first_example=first_example)

    def _sampled_loss(self, targets, y_pred, sample_weight):
        """The compiled loss at sampled targets, scaled as the optimizer scales the loss."""
        if self._sampler is None:
            raise ValueError("Compile the FisherModel before training it.")
        return self.optimizer.scale_loss(self._sampler.loss(targets, y_pred, sample_weight))

    def _unscale(self, grads):
        """Undoes a LossScaleOptimizer's dynamic scale on sampled-label gradients."""
        dynamic_scale = getattr(self.optimizer, "dynamic_scale", None)
        if dynamic_scale is None:
            return grads
        out = []
        for g in grads:
            if keras.backend.standardize_dtype(g.dtype) in ("float16", "bfloat16"):
                # In float32 at least: pre-activation gradients (KFAC) are float16 under
                # mixed_float16, and small ones would become subnormal after the division.
                out.append(ops.cast(g, "float32") / ops.cast(dynamic_scale, "float32"))
            else:
                out.append(g / ops.cast(dynamic_scale, g.dtype))
        return out

    def _curvature_keys(self, optimizer):
        """``(keys, layers)``: what ``update_curvature``'s 2nd argument is, and what to record.

        For per-variable statistics (TNT, Shampoo) the trainable variables and no layers. For
        per-layer statistics (KFAC) the factored layers whose kernel is trainable now, both
        times: a layer frozen after the optimizer was built keeps its factors and is not
        recorded.
        """
        if getattr(optimizer, "curvature_inputs", "gradients") != "layers":
            return list(self.trainable_variables), None
        trainable = {id(v) for v in self.trainable_variables}
        layers = [
            block.layer
            for block in optimizer.blocks
            if id(kernel_variable(block.layer)) in trainable
        ]
        return layers, layers

    @staticmethod
    def _layer_records(layers, records):
        pairs = []
        for layer in layers:
            calls = records[id(layer)]
            if not calls:
                raise ValueError(
                    f"KFAC factors layer {layer.name!r}, but the forward pass never called it (an "
                    "unused or conditionally used layer). Freeze it (`trainable=False`) or remove "
                    "it from the model."
                )
            if len(calls) > 1:
                raise ValueError(
                    f"KFAC factors layer {layer.name!r} from its one call per forward pass, but "
                    f"it ran {len(calls)} times (a shared layer, or one inside TimeDistributed or "
                    "Bidirectional). KFAC does not support that; use TNT or Shampoo, which "
                    "precondition per tensor."
                )
            pairs.append(calls[0])
        return pairs

    def _call_for_training(self, x):
        return self(x, training=True) if self._call_has_training_arg else self(x)

    # ------------------------------------------------------------ warm start

    def warm_start(self, x, batch_size: int | None = None, steps: int | None = None, verbose=1):
        """Folds sampled-label gradients at the current weights into the optimizer's statistics.

        Runs one pass over ``x`` (a ``tf.data.Dataset`` of batches, or arrays batched by
        ``batch_size``, default 32), or ``steps`` batches of it, and sets the statistics to the
        running mean of their contractions (``optimizer.accumulate_curvature``; on statistics
        that already hold batches, it continues their running mean). No weight changes. Call it
        after ``compile`` and before ``fit``; see also :class:`WarmStart`.
        """
        optimizer = self.statistics_optimizer
        if optimizer is None:
            raise ValueError(
                "warm_start needs a model compiled with an optimizer that keeps Fisher "
                "statistics (e.g. keras_tnt.TNT); compile the model first."
            )
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(f"`steps` must be None or an integer >= 1; received steps={steps!r}.")
        if not optimizer.built:
            with self._build_scope():
                optimizer.build(self.trainable_variables)
        batches, total, step = self._warm_start_batches(x, batch_size, steps)
        progbar = keras.utils.Progbar(
            total, verbose=1 if verbose == "auto" else verbose, unit_name="warm-start batch"
        )
        done = 0
        for data in batches:
            step(data)
            done += 1
            progbar.update(done)
        if done == 0:
            raise ValueError("warm_start received an empty dataset.")
        return done


class WarmStart(keras.callbacks.Callback):
    """Runs :meth:`FisherModel.warm_start` at the start of ``fit``, unless already done.

    A run resumed from a checkpoint (optimizer step > 0 or statistics already warm-started) is
    not warm-started again. Copies (``copy.deepcopy``, which KerasTuner applies to a search's
    callbacks for every trial) share ``data``, which the warm start only reads: a
    ``tf.data.Dataset`` cannot be copied.
    """

    def __init__(self, data, batch_size: int | None = None, steps: int | None = None, verbose=1):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.steps = steps
        self.verbose = verbose

    def __deepcopy__(self, memo):
        clone = type(self)(
            self.data, batch_size=self.batch_size, steps=self.steps, verbose=self.verbose
        )
        memo[id(self)] = clone
        return clone

    def on_train_begin(self, logs=None):
        if not isinstance(self.model, FisherModel):
            raise ValueError(
                "WarmStart needs a keras_tnt.FisherModel; wrap the model with "
                "keras_tnt.FisherModel.from_model(model)."
            )
        optimizer = self.model.statistics_optimizer
        if optimizer is None:
            raise ValueError(
                "WarmStart needs the model compiled with keras_tnt.TNT (or another "
                "optimizer with Fisher statistics)."
            )
        self.model.build_optimizer()  # a state loaded before the build is restored now
        if int(backend.value_now(optimizer.iterations)) > 0 or optimizer.warm_start_batches:
            return
        self.model.warm_start(
            self.data, batch_size=self.batch_size, steps=self.steps, verbose=self.verbose
        )
