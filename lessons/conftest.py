"""nbval set-up for the lessons.

Leave stderr out of the comparison: since ipykernel 6, C++ log lines that
TensorFlow, XLA or CUDA write to file descriptor 2 become cell output, and
what they say depends on the backend and the machine. Every other output
(stdout, ``text/plain`` results, errors) is still compared.
"""


def pytest_collectstart(collector):
    if str(getattr(collector, "fspath", "")).endswith(".ipynb") and hasattr(collector, "skip_compare"):
        collector.skip_compare = tuple(collector.skip_compare) + ("stderr",)
