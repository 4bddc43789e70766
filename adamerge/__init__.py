"""adamerge: learn how to merge models.

Merge coefficients (task-, layer-, group- or chunk-wise) are ``nn.Parameter``s of a
functional merged model; objectives on unlabelled data (entropy, alignment, ...) train
them. See the README for the tour.
"""

from adamerge import methods
from adamerge.core.constraints import Clamp, Sigmoid
from adamerge.core.layouts import CoefficientLayout, build_layout
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.merged import MergedModel
from adamerge.core.task_vectors import TaskVectors

__all__ = [
    "Clamp",
    "CoefficientLayout",
    "MergeCoefficients",
    "MergedModel",
    "Sigmoid",
    "TaskVectors",
    "build_layout",
    "methods",
]
__version__ = "0.1.0"
