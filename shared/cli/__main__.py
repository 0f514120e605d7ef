"""``python -m shared.cli``: the processes that ``gestalt up``, the tests and the deploy files start."""
from shared.cli import run

run()
