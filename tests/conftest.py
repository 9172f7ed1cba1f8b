import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the variable must be set before the kernels
# are first imported (triton.jit reads it when it decorates them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The profile governs every property: `ci` (selected by .ci/run) runs 1,000 examples each, `default` (local runs)
# 60. No property sets its own count, except through `interpreted_examples` below.
settings.register_profile("ci", max_examples=1000, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def interpreted_examples() -> int:
    """Examples for a property that runs Triton's CPU interpreter (about 2 s an example on 2 cores): 1/100 of the
    profile's count (10 under `ci`), at least 5."""
    return max(5, settings.default.max_examples // 100)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
