"""Process defaults shared by the command-line tools (train.py, tuning/, benchmarks/)."""

from __future__ import annotations

import logging


def quiet_tensorflow_logging(verbosity_flag_present: bool = False) -> None:
    """TensorFlow's Python log lines once, and from WARNING up unless asked for.

    Under ``absl.app.run`` every TensorFlow log record is printed twice (by TensorFlow's own
    handler and again by absl's handler on the root logger), and absl lowers the threshold to
    INFO, so start-up chatter ("Using MirroredStrategy ...") comes first and doubled. This keeps
    TensorFlow's own handler only and sets WARNING, so real warnings stay visible; absl's
    ``--verbosity``/``-v`` given on the command line keeps absl's threshold instead. The C++
    log lines follow ``TF_CPP_MIN_LOG_LEVEL`` (the tools set 2 unless it is set already).
    """
    logger = logging.getLogger("tensorflow")
    logger.propagate = False
    if not verbosity_flag_present:
        logger.setLevel(logging.WARNING)
