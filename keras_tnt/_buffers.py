"""Factor buffers: the equal-size factors of many tensors kept in one variable.

TNT and Shampoo keep their statistics and preconditioners in one buffer variable ``(n,) + shape``
per factor size (and dtype, and Shampoo's root order): a step folds, reads and writes each size
with one operation instead of one per factor (docs/algorithm.md §2, "Factor buffers"); a large
factor keeps a buffer of one row, its own. A
:class:`Row` names one factor's place in its buffer and stands for a slot wherever the optimizers
handle slots one by one (:func:`read_slots`, :func:`assign_slots`).
"""

from __future__ import annotations

from keras import ops

from keras_tnt import backend


class Row:
    """Row ``index`` of the buffer variable ``buffer``: one factor's slot."""

    __slots__ = ("buffer", "index")

    def __init__(self, buffer, index: int):
        self.buffer = buffer
        self.index = int(index)

    @property
    def shape(self) -> tuple:
        return tuple(self.buffer.shape[1:])

    @property
    def dtype(self):
        return self.buffer.dtype

    @property
    def path(self) -> str:
        return f"{self.buffer.path}[{self.index}]"

    def value(self):
        """The row's current value (a tensor: a row is read-only; see :func:`assign_slots`)."""
        return backend.read_value(self.buffer)[self.index]

    def __repr__(self) -> str:
        return f"<Row {self.path} shape={self.shape} dtype={self.dtype}>"


def read_slots(slot_lists) -> list:
    """The values of ``[[slot, ...], ...]`` (variables or :class:`Row` s), in the same
    structure: each variable read once, each buffer read and unstacked once."""
    rows = {}

    def value(slot):
        if isinstance(slot, Row):
            key = id(slot.buffer)
            if key not in rows:
                rows[key] = ops.unstack(backend.read_value(slot.buffer))
            return rows[key][slot.index]
        return backend.read_value(slot)

    return [[value(s) for s in slots] for slots in slot_lists]


def assign_slots(optimizer, pairs) -> None:
    """Assigns ``[(slot, value)]``: a variable directly, the rows of a buffer stacked into one
    assignment of the buffer (the rows not given keep their values)."""
    buffers = {}
    for slot, value in pairs:
        if isinstance(slot, Row):
            buffers.setdefault(id(slot.buffer), (slot.buffer, {}))[1][slot.index] = value
        else:
            optimizer.assign(slot, value)
    for buffer, given in buffers.values():
        n = buffer.shape[0]
        if len(given) < n:
            current = ops.unstack(backend.read_value(buffer))
            given = {i: given.get(i, current[i]) for i in range(n)}
        if n == 1:  # a buffer of its own: its value, not a copy
            optimizer.assign(buffer, ops.expand_dims(given[0], 0))
        else:
            optimizer.assign(buffer, ops.stack([given[i] for i in range(n)]))
