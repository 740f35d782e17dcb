"""KerasTuner sweeps over the paper's grids, and multi-seed reproductions of its comparisons.

* ``python -m tuning.sweep``: one resumable grid search per (problem, optimizer); every trial is
  one ``train.py`` run, and the winner is written as a flag file that ``train.py`` accepts.
* ``python -m tuning.reproduce``: every optimizer of :data:`models.registry.OPTIMIZERS` with its
  best configuration over several seeds; a results table (CSV, Markdown) and the paper-style
  figure (mean curve with a ±1 standard-deviation band, against epochs and against time).

Both run from the repository root, like ``train.py``.
"""
