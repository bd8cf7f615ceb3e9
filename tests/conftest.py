import os

import pytest
import torch

os.environ.setdefault("ARVGQ_NO_PROGRESS", "1")
# One intra-op thread: the tiny test models are dominated by per-op overhead, and on a loaded
# 2-core machine two threads made them 10-100x slower (measured while several jobs ran).
torch.set_num_threads(1)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
