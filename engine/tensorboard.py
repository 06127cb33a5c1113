"""Moved to engine/tracking/tensorboard.py (TensorBoard is one of the run's loggers); this name stays
importable and is the same module object, so patching it patches the logger."""

import sys

from engine.tracking import tensorboard as _tensorboard

sys.modules[__name__] = _tensorboard
