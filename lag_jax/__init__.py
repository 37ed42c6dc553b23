"""lag_jax: LoRA-Augmented Generation (LAG) in JAX and Flax NNX.

Shape vocabulary, used in docstrings, einsum strings and names throughout:

  B batch            T tokens (query positions)   S cache / key length
  D model width      F MLP width                  H query heads
  K kv heads         E head dim                   V vocabulary
  N adapters         R LoRA rank                  C candidates (top-k)
  L layers           I a linear module's input width, O its output width
"""

import os as _os

# JAX's CPU QR / SVD call into OpenBLAS, whose own thread pool fights XLA's on small
# machines: batched signature SVDs then slow down 10x or hang. One BLAS thread is
# what XLA expects. Set before numpy / jax load BLAS (callers may override it).
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
