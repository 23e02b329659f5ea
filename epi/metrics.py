"""`epi.metrics`: the public path of the evaluation metrics, which live in epi.analysis.metrics."""
from epi.analysis.metrics import *  # noqa: F401,F403
from epi.analysis.metrics import __all__  # noqa: F401
