"""`python -m jax_impl.evaluate WEIGHTS`: test accuracy of JAX weights (see --help)."""

import sys

from common.evaluation import main
from jax_impl.train import FRAMEWORK

if __name__ == "__main__":
    sys.exit(main(FRAMEWORK))
