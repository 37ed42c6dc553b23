"""Module-input moments (lag_jax/routing/calibration.py) against the inputs recorded one
sequence at a time, unpadded."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lag_jax.model.transformer import CausalLM
from lag_jax.routing import calibration
from lag_jax.testing import tiny_config


def test_input_moments_equal_a_numpy_sum_over_each_unpadded_sequence():
  cfg = tiny_config()
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(0, cfg.vocab_size, n)) for n in (5, 9, 3, 12, 7)]
  modules = ("up_proj", "down_proj", "q_proj")
  got, count = calibration.input_moments(model, seqs, modules, batch_size=2)
  assert count == sum(map(len, seqs))
  hook = calibration.recorder(model, modules)
  graphdef, state = nnx.split(model)
  for m in modules:
    xs = [
      np.asarray(
        calibration.module_inputs(graphdef, state, jnp.asarray([s], jnp.int32), hook)[m][0]
      )[:, 0]
      for s in seqs
    ]  # each [L, T, I]
    x = np.concatenate(xs, axis=1).astype(np.float64)
    want = np.einsum("lti,ltj->lij", x, x) / count
    I = cfg.module_shapes()[m][1]
    assert got[m].shape == (cfg.num_hidden_layers, I, I)
    np.testing.assert_allclose(got[m], want, rtol=1e-4, atol=1e-6)


def test_input_moments_bad_inputs():
  model = CausalLM(tiny_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no calibration tokens"):
    calibration.input_moments(model, [[], []], ("up_proj",))
  with pytest.raises(ValueError, match="no modules \\['fc9'\\]"):
    calibration.input_moments(model, [[1, 2]], ("fc9",))
