"""The tiny test config: a random 2-layer model with a byte-level tokenizer.

python -m lag_jax.run --config=configs/tiny.py --workdir=/tmp/lag_tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import generate  # noqa: E402


def get_config(arg: str | None = None):
  del arg
  return generate.get_config("tiny")
