"""Shared test set-up. ``KERAS_BACKEND`` is chosen by the caller (``make test``)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Each new shape is a new XLA compilation on JAX: keep the example count modest.
settings.register_profile("keras", max_examples=20, deadline=None, derandomize=False)
settings.load_profile("keras")

from backend_info import BACKEND  # noqa: E402


def pytest_report_header(config):
    return f"KERAS_BACKEND={BACKEND}, keras {keras.__version__}"


@pytest.fixture
def rng():
    """Fresh random inputs each run; the seed is printed when a test fails."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under the float32 policy."""
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
