"""`epi.hf`: the public path of the Hugging Face Trainer integration, which lives in epi.integrations.hf."""
from epi.integrations.hf import *  # noqa: F401,F403
from epi.integrations.hf import __all__  # noqa: F401
