"""Saving and restoring the optimizers' state, also when it is loaded before they are built."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_tnt import backend


class SavedStateMixin:
    """Restores by index, all or nothing; keeps a state loaded before the build until then;
    converts a state saved with an older layout (keras-tnt 0.2 to 0.5).

    Needs ``self._unbuilt_variable_count`` (the variables an unbuilt optimizer has: iterations
    and learning rate), set in ``__init__``. The build describes the old layout as it creates
    the new one (:meth:`_start_legacy_layout`, :meth:`_kept_in_place`, :meth:`_legacy`,
    :meth:`_legacy_target`): per variable of the old layout, in its order, where its value
    goes.

    0.4 keeps a step's counters whole: one vector of statistics counts (one per variable or
    layer) and one counter each for skipped updates and failed refreshes, where 0.2 and 0.3
    kept a scalar per variable for each (KFAC: per variable and per layer, and a layer flag that
    was always 0), so that a step adds to each with one operation. 0.5 keeps TNT's and
    Shampoo's statistics and inverses in one buffer per factor size (a matrix per variable
    before), so that a step folds, reads and writes each size with one operation; 0.6 gives a
    large factor a buffer of its own, one row, whose fold is not a stack (0.5's buffers: one
    per size, the large factors' rows in them).
    """

    def _start_legacy_layout(self, versions=("0.3",)):
        """Begins the description of the old layouts ``versions`` (``"0.3"``: the layout of 0.2
        and 0.3; ``"0.4"``: TNT's and Shampoo's before 0.5; ``"0.5"``: theirs before 0.6), at
        the start of the build: every variable so far, Keras' own, is where every old layout
        had it."""
        # Plain Python state, never tracked: {version: [(kind, ...)] in the old order}.
        object.__setattr__(self, "_legacy_layouts", {v: [] for v in versions})
        object.__setattr__(self, "_legacy_targets", {})
        self._kept_in_place(0)

    def _kept_in_place(self, start, versions=None):
        """The variables created since index ``start`` come next in the old layouts
        ``versions`` (default: all), in the same order."""
        for k in range(start, len(self.variables)):
            self._legacy("same", k, versions=versions)

    def _legacy(self, *entry, versions=None):
        """The next variable of the old layouts ``versions`` (default: all): ``("same", k)``:
        today's variable ``k``; ``("into", target, position)``: element ``position`` of the
        variable named ``target`` (a vector's element, a buffer's matrix); ``("sum",
        target)``: added into the counter ``target``; ``("rows", [(target, position)])``: a
        buffer whose row ``r`` is element ``position`` of the variable named ``target``, the
        ``r``-th pair; ``("zero",)``: an old counter that was always 0 (dropped)."""
        layouts = self.__dict__["_legacy_layouts"]
        for version in layouts if versions is None else versions:
            layouts[version].append(entry)

    def _variable_index(self, variable) -> int:
        """Where ``variable`` is in ``self.variables`` (by identity)."""
        return next(k for k, v in enumerate(self.variables) if v is variable)

    def _legacy_target(self, name, variable):
        self.__dict__["_legacy_targets"][name] = self._variable_index(variable)

    def _from_legacy(self, store):
        """``store`` in today's layout if it holds a state of an old one (every variable's
        shape as that layout had it), else None."""
        for layout in self.__dict__.get("_legacy_layouts", {}).values():
            out = self._convert(store, layout)
            if out is not None:
                return out
        return None

    def _convert(self, store, layout):
        if len(store.keys()) != len(layout):
            return None
        targets = self.__dict__["_legacy_targets"]
        values = [np.array(store[str(i)]) for i in range(len(layout))]
        out = {}
        for k in targets.values():  # zeros, then the old values placed or added in
            target = self.variables[k]
            out[k] = np.zeros(tuple(target.shape), dtype=np.dtype(target.dtype))
        for entry, value in zip(layout, values):
            kind = entry[0]
            if kind == "same":
                want = tuple(self.variables[entry[1]].shape)
            elif kind == "into":
                want = tuple(self.variables[targets[entry[1]]].shape[1:])
            elif kind == "rows":  # rows of one factor size
                want = (len(entry[1]),) + tuple(self.variables[targets[entry[1][0][0]]].shape[1:])
            else:
                want = ()
            if tuple(np.shape(value)) != want:
                return None
            if kind == "same":
                out[entry[1]] = value
        for entry, value in zip(layout, values):
            kind = entry[0]
            if kind == "rows":
                for row, (target, position) in zip(value, entry[1], strict=True):
                    out[targets[target]][position] = row
            elif kind in ("into", "sum"):
                k = targets[entry[1]]
                if kind == "into":
                    out[k][entry[2]] = value
                else:
                    out[k] = out[k] + value
        if sorted(out) != list(range(len(self.variables))):
            return None
        return {str(k): v for k, v in out.items()}

    def _restore_pending(self):
        """Restores a state loaded before the optimizer was built (the end of ``build``)."""
        pending = self.__dict__.pop("_pending_state", None)
        if pending is None:
            return
        with backend.outside_graph():
            try:
                self._restore(pending)
            except ValueError as error:
                # Keras builds inside the first traced step, where an error would leave a
                # half-built optimizer behind: `_restore` checks before it assigns anything, so
                # say it loudly and train from the fresh state, as Keras' own optimizers do.
                # (FisherModel builds its optimizer before loading, and raises.)
                warnings.warn(
                    f"{error} The loaded optimizer state was NOT restored: training starts "
                    "from a fresh optimizer state.",
                    stacklevel=2,
                )

    def load_own_variables(self, store):
        """Restores the state saved by ``save_own_variables`` (``.keras`` files, weights files).

        An optimizer that is not built yet (``model.load_weights`` on a freshly compiled model,
        KerasTuner's ``get_best_models``) keeps the saved values and restores them when it is
        built, so training continues from the saved state. A state saved for other variables is
        an error, never a partial restore.
        """
        keys = list(store.keys())
        if not self.built:
            if keys:
                # Not an attribute TensorFlow's checkpoint tracking should wrap or follow.
                object.__setattr__(self, "_pending_state", {k: np.array(store[k]) for k in keys})
            return
        if not keys:
            warnings.warn(
                f"Optimizer '{self.name}': the file holds no optimizer state (it was saved "
                "without one); the optimizer keeps its current state.",
                stacklevel=2,
            )
            return
        self._restore(store)

    def save_own_variables(self, store):
        pending = self.__dict__.get("_pending_state")
        if not self.built and pending is not None:
            # Loaded, not built yet: the loaded state is this optimizer's state.
            for key, value in pending.items():
                store[key] = value
            return
        super().save_own_variables(store)

    def _layout_note(self) -> str:
        """What a reader of a layout error should know about this optimizer's layout."""
        count = sum(getattr(self, "_row_sparse", []))
        if not count:
            return ""
        return (
            f" This optimizer takes the row-sparse step for {count} tensor(s) (a diagonal first "
            "factor: docs/algorithm.md §2) and keeps their damped factors since keras-tnt 0.3; "
            "a state saved by keras-tnt 0.2 for such tensors does not load."
        )

    def _restore(self, store):
        if len(store.keys()) == self._unbuilt_variable_count < len(self.variables):
            # Saved before it was ever built (compiled, not trained): its step counter and
            # learning rate; the statistics start fresh, as they would have.
            for i in range(self._unbuilt_variable_count):
                self.variables[i].assign(store[str(i)])
            return
        if len(store.keys()) != len(self.variables) or any(
            tuple(v.shape) != tuple(np.shape(store[str(i)])) for i, v in enumerate(self.variables)
        ):
            # A state saved with an older layout (keras-tnt 0.2 to 0.5): converted if it is one.
            store = self._from_legacy(store) or store
        if len(store.keys()) != len(self.variables):
            raise ValueError(
                f"Cannot restore optimizer '{self.name}': the saved state has "
                f"{len(store.keys())} variables but this optimizer has {len(self.variables)}. "
                "Build it on the same model (same trainable variables, same order) before "
                "loading; restoring only part of the Kronecker statistics would silently change "
                "the training run. To load only the model's weights, load them before "
                f"`compile()`, or pass `skip_mismatch=True`.{self._layout_note()}"
            )
        for i, variable in enumerate(self.variables):
            value = store[str(i)]
            if tuple(variable.shape) != tuple(np.shape(value)):
                raise ValueError(
                    f"Cannot restore optimizer '{self.name}': saved variable {i} has shape "
                    f"{tuple(np.shape(value))}, but {variable.path} has shape "
                    f"{tuple(variable.shape)}. The state was saved for another model."
                )
        keras.optimizers.Optimizer.load_own_variables(self, store)
