"""Which Keras backend this test process runs, for tests that adapt to it.

A module of its own (not ``conftest``): ``lessons/conftest.py`` exists too, and
two modules named ``conftest`` cannot both be imported by name.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

BACKEND = keras.backend.backend()
# Backends where Keras compiles a train step with XLA (jit_compile=True).
JIT_BACKENDS = ("tensorflow", "jax")
