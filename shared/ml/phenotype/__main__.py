"""``python -m shared.ml.phenotype``: the simulation table (``--help`` for its options)."""
from shared.ml.phenotype.evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
