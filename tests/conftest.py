import os
from pathlib import Path

import pytest
import torch

from helpers import SHARED_REAL, small_llama

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # 2 xdist workers on 2 cores: oversubscribed OpenMP threads crawl


@pytest.fixture
def llama():
    return small_llama()


@pytest.fixture
def shared_real() -> Path:
    if not SHARED_REAL.is_dir():
        pytest.skip("../shared/data/real is absent (only present on the project's machines)")
    return SHARED_REAL
