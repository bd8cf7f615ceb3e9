import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("ARVGQ_NO_PROGRESS", "1")

# Without a GPU the Triton kernels run under Triton's interpreter (tests/test_cuda_kernels.py). Triton
# picks interpreted or compiled versions of its own helpers when it is first imported, so import it here,
# before any test module can, with TRITON_INTERPRET set; then unset it, so that everything else keeps
# running the kernels' torch reference on CPU tensors (backends.cuda.ops reads it at each call).
if not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton

        triton.arvgq_interpreted = True  # tests/test_cuda_kernels.py checks this
    except ImportError:
        pass
    finally:
        if _saved is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = _saved
# One intra-op thread: the tiny test models are dominated by per-op overhead, and on a loaded
# 2-core machine two threads made them 10-100x slower (measured while several jobs ran).
torch.set_num_threads(1)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def compiled_script(tmp_path):
    """Runs a Python script in a fresh process whose Triton compiles instead of interpreting (a GPU binary needs
    no GPU: Triton ships ptxas), with its own cache; returns what it printed, or fails with its error."""
    def run(script: str) -> str:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=root)
        done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    return run
