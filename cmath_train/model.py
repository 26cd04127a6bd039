"""Compatibility alias: CMATH lives in cmath_train/models/cmath.py beside the other models."""

from .models.cmath import CMATH, CMATHOutput, CMATransformer, StepCache  # noqa: F401
from .models.common import Standardize, check_inputs, set_standardize_stats  # noqa: F401
