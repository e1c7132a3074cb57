"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit module is imported: the
kernels are tested on CPU through the Triton interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter runs each tl.dot as a small numpy matmul; multi-threaded OpenBLAS on 2 busy
# cores made those ~30x slower. torch's own GEMMs do not use OpenBLAS, so this costs them nothing.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def seed(request):
    """A fresh seed per test run (inputs differ every run), printed so a failure can be replayed
    with CRISP_FAST_SEED=<seed>."""
    value = int(os.environ.get("CRISP_FAST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    random.seed(value)
    print(f"[{request.node.name}] seed = {value}")
    return value
