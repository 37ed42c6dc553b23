"""lag_jax: LoRA-Augmented Generation (LAG) in JAX and Flax NNX.

Shape vocabulary, used in docstrings, einsum strings and names throughout:

  B batch            T tokens (query positions)   S cache / key length
  D model width      F MLP width                  H query heads
  K kv heads         E head dim                   V vocabulary
  N adapters         R LoRA rank                  C candidates (top-k)
  L layers           I a linear module's input width, O its output width
"""

__version__ = "0.1.0"
