"""A library sharded over 8 simulated devices: placement and bytes per device, every
router under shard_map equal to the single-device routers (prefill and decode, masks
confined to one shard, N not divisible by 8, exact ties), the collectives the compiled
HLO moves, routing inside the model and ``generate``, and the CLI with a mesh."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_offload import random_library

from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.generation import generate
from lag_jax.model import sharding as shd
from lag_jax.model.transformer import MLP_MODULES
from lag_jax.routing import request
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.library import AdapterLibrary, LibraryWeights
from lag_jax.routing.routers import LayerLibrary, RouterSpec, route_batch
from lag_jax.routing.sharded import (
  AdapterSharding,
  hlo_collectives,
  library_partition_spec,
  route_batch_sharded,
  route_sharded,
  shard_library,
)
from lag_jax.routing.shared import remove_shared
from lag_jax.testing import tiny_checkpoint, tiny_config
from lag_jax.testing.libraries import jitted_forward

ATOL = 1e-5
CFG = tiny_config()
L = CFG.num_hidden_layers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def mesh():
  return shd.mesh_from_sizes({"data": 1, "model": 1, "adapter": -1})


def layer_arrays(weights: LibraryWeights, module: str, layer: int):
  w = weights
  return tuple(getattr(w, f)[module][layer] for f in ("a", "b", "arrows", "valid"))


@functools.partial(jax.jit, static_argnames=("specs",))
def _single(specs, router_index, x, lib, mask, fixed):
  return route_batch(specs, router_index, x, LayerLibrary(*lib), mask, fixed)


@functools.partial(jax.jit, static_argnames=("specs", "sharding"))
def _sharded(specs, router_index, x, lib, mask, fixed, sharding):
  return route_batch_sharded(specs, router_index, x, LayerLibrary(*lib), mask, fixed, sharding)


def _pad_mask(mask, n_pad):
  return np.pad(mask, ((0, 0), (0, n_pad - mask.shape[1])))


# --- Mesh, rules and placement ------------------------------------------------------


def test_mesh_from_sizes_and_rules():
  assert len(jax.devices()) == 8  # conftest: multi-device tests can never skip
  assert dict(mesh().shape) == {"data": 1, "model": 1, "adapter": 8}
  assert shd.mesh_from_sizes({"data": 1, "model": 1, "adapter": 1}) is None
  assert dict(shd.mesh_from_sizes({"data": 2, "adapter": -1}).shape) == {"data": 2, "adapter": 4}
  assert shd.mesh_from_sizes({"adapter": 4}).devices.size == 4  # a subset of the host
  with pytest.raises(ValueError, match="needs 16 devices"):
    shd.mesh_from_sizes({"data": 2, "adapter": 8})
  assert shd.DEFAULT_RULES["adapter"] == "adapter"
  assert library_partition_spec("a", mesh()) == PartitionSpec(None, "adapter", None, None)
  assert library_partition_spec("arrows", mesh()) == PartitionSpec(None, None, "adapter")
  with pytest.raises(ValueError, match="'adapter' to 'experts'"):
    shard_library(random_library(8, ["up_proj"]), mesh(), {"adapter": "experts"})


@pytest.mark.parametrize("n", [64, 13])
def test_library_bytes_per_device(n):
  lib = random_library(n, MLP_MODULES, invalid=[0])
  sharded = shard_library(lib, mesh())
  n_pad = -(-n // 8) * 8
  assert sharded.padded_size == n_pad and len(sharded) == n
  per_device = sharded.nbytes_per_device()
  assert sorted(per_device) == [d.id for d in jax.devices()]
  assert len(set(per_device.values())) == 1  # the same on every device
  if n % 8 == 0:
    assert sharded.nbytes() == lib.nbytes()
    assert abs(per_device[0] / (lib.nbytes() / 8) - 1) < 0.05
  else:  # padded: N_pad / 8 adapters per device, each as large as a real one
    assert per_device[0] * 8 == sharded.nbytes() == lib.nbytes() * n_pad // n
  for m in MLP_MODULES:
    a, valid = sharded.weights.a[m], sharded.weights.valid[m]
    assert {s.data.shape for s in a.addressable_shards} == {(L, n_pad // 8, 4, a.shape[-1])}
    np.testing.assert_array_equal(np.asarray(a)[:, :n], np.asarray(lib.weights.a[m]))
    assert not np.asarray(valid)[:, n:].any() and not np.asarray(a)[:, n:].any()


# --- Every router, sharded vs one device ------------------------------------------

N = 37  # padded to 40: 5 adapters per device
SPECS = (
  RouterSpec("none"),
  RouterSpec("fixed"),
  RouterSpec("uniform"),
  RouterSpec("arrow"),
  RouterSpec("arrow_softmax", k=3),
  RouterSpec("arrow_softmax", k=7, temperature=0.3),  # k > adapters per device
  RouterSpec("spectr"),
  RouterSpec("lag", k=3),
  RouterSpec("lag", k=7, projection="gather"),
  RouterSpec("lag", k=50, projection="dense"),  # k > N: SpectR
  RouterSpec("lag", k=3, projection="grouped"),
)


def router_inputs(batch, tokens, seed=1):
  """Row 0 may use all; 1 a random half; 2 only adapters 15-19 (all on device 3);
  3 one adapter. Adapters 0 and 21 are invalid; fixed ids hit devices 0, 3, 3, 0."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, tokens, 64)).astype(np.float32)
  mask = np.ones((batch, N), bool)
  mask[1] = rng.permutation(N) < N // 2
  mask[2] = False
  mask[2, 15:20] = True
  mask[3] = False
  mask[3, 7] = True
  return x, mask, np.array([3, 16, 17, 0], np.int32)


@pytest.mark.parametrize("tokens", [5, 1], ids=["prefill", "decode"])
def test_every_router_matches_single_device(tokens):
  lib = random_library(N, ["gate_proj"], invalid=[0, 21], seed=tokens)
  sharded = shard_library(lib, mesh())
  x, mask, fixed = router_inputs(4, tokens)
  single_lib = layer_arrays(lib.weights, "gate_proj", 1)
  shard_lib = layer_arrays(sharded.weights, "gate_proj", 1)
  mask_pad = _pad_mask(mask, sharded.padded_size)
  indices = [np.full(4, i, np.int32) for i in range(len(SPECS))]
  indices.append(np.array([7, 5, 6, 1], np.int32))  # routers mixed across requests
  for index in indices:
    d1, c1 = _single(SPECS, index, x, single_lib, mask, fixed)
    d8, c8 = _sharded(SPECS, index, x, shard_lib, mask_pad, fixed, sharded.sharding)
    where = [SPECS[i] for i in index]
    np.testing.assert_array_equal(np.asarray(c8), np.asarray(c1), err_msg=str(where))
    np.testing.assert_allclose(
      np.asarray(d8), np.asarray(d1), atol=ATOL, rtol=0, err_msg=str(where)
    )
    name = SPECS[index[0]].name
    if len(set(index)) == 1 and name not in ("none", "uniform", "fixed"):
      assert (np.asarray(c1)[2] >= 15).all() and (np.asarray(c1)[2] < 20).all()
      assert (np.asarray(c1)[3] == 7).all()
    if name != "none":
      assert np.abs(np.asarray(d1)).max() > 0.1  # not vacuous
  if tokens == 1:
    return
  # XLA's own partitioning of the single-device routers (the alternative impl).
  jit_sharding = AdapterSharding(mesh(), impl="jit")
  d_jit, c_jit = _sharded(SPECS, indices[-1], x, shard_lib, mask_pad, fixed, jit_sharding)
  np.testing.assert_array_equal(np.asarray(c_jit), np.asarray(c1))
  np.testing.assert_allclose(np.asarray(d_jit), np.asarray(d1), atol=ATOL, rtol=0)


def test_ties_go_to_the_lower_id_across_devices():
  """Integer inputs and A* rows that are unit vectors make scores and norms exact,
  so equal values are truly equal: adapters sharing a direction tie, on the same
  device and on different ones (16 adapters, 2 per device)."""
  rng = np.random.default_rng(3)
  n, R, I, O = 16, 2, 64, 128
  dirs = rng.integers(0, 4, (n, R)) * 2 + np.arange(R)  # few distinct directions: many ties
  a = np.zeros((n, R, I), np.float32)
  a[np.arange(n)[:, None], np.arange(R), dirs] = 1.0
  b = rng.integers(-3, 4, (n, O, R)).astype(np.float32)
  arrows = a[:, 0, :].T.copy()
  valid = np.ones(n, bool)
  x = rng.integers(-2, 3, (3, 6, I)).astype(np.float32)
  mask = np.ones((3, n), bool)
  mask[1, ::2] = False  # odd ids only
  mask[2, :8] = False  # the upper half only
  fixed = np.array([5, 2, 9], np.int32)
  lib = (a, b, arrows, valid)
  sharding = shard_library(
    AdapterLibrary(
      tuple(map(str, range(n))),
      ("gate_proj",),
      R,
      (R,) * n,
      LibraryWeights(*({"gate_proj": jnp.asarray(v)[None]} for v in lib)),
    ),
    mesh(),
  )
  shard_lib = layer_arrays(sharding.weights, "gate_proj", 0)
  specs = (
    RouterSpec("arrow"),
    RouterSpec("spectr"),
    RouterSpec("lag", k=2),
    RouterSpec("lag", k=5),
    RouterSpec("arrow_softmax", k=3),
  )
  for i in range(len(specs)):
    index = np.full(3, i, np.int32)
    d1, c1 = _single(specs, index, x, lib, mask, fixed)
    d8, c8 = _sharded(specs, index, x, shard_lib, mask, fixed, sharding.sharding)
    np.testing.assert_array_equal(np.asarray(c8), np.asarray(c1), err_msg=str(specs[i]))
    np.testing.assert_allclose(np.asarray(d8), np.asarray(d1), atol=ATOL, rtol=0)
  # The brute-force rule for arrow: the lowest id among the allowed maxima of |x_dir|.
  scores = np.abs(np.einsum("bti,in->btn", x, arrows))
  scores = np.where(mask[:, None, :], scores, -1)
  best = scores.max(-1, keepdims=True)
  expected = np.argmax(scores == best, axis=-1)
  assert (np.sum(scores == best, axis=-1) > 1).mean() > 0.3  # ties are common here
  _, c_arrow = _sharded(specs, np.zeros(3, np.int32), x, shard_lib, mask, fixed, sharding.sharding)
  np.testing.assert_array_equal(np.asarray(c_arrow), expected)


# --- Communication -------------------------------------------------------------------

HLO_SPECS = (
  RouterSpec("lag", k=4),
  RouterSpec("arrow_softmax", k=4),
  RouterSpec("spectr"),
  RouterSpec("uniform"),
  RouterSpec("fixed"),
  RouterSpec("arrow"),
)


REQUEST_SPECS = (
  RouterSpec("vote", k=4, vote_score="score", vote_top_m=2),
  RouterSpec("request_lag", k=4),
  RouterSpec("lag", k=4, gate=0.2),
  RouterSpec("uniform"),
)


@functools.partial(jax.jit, static_argnames=("specs", "sharding", "C"))
def _sharded_request(specs, router_index, x, lib, mask, fixed, sharding, layer, span, state, C):
  lib = LayerLibrary(*lib)
  kw = dict(layer=layer, span=span, state=state, C=C)
  return route_sharded(specs, router_index, x, lib, mask, fixed, sharding, **kw)


def _collectives(n, phase="per_token", removal="none", batch=2, tokens=1):
  """The collectives of one compiled routing call on a library of n adapters split over
  8 devices: per-token routers, or request-level ones resolving (votes, candidates) or
  with their state; with or without shared directions removed."""
  lib = shard_library(random_library(n, ["gate_proj"], rank=4), mesh())
  lib, _ = remove_shared(lib, removal)
  shard_lib = layer_arrays(lib.weights, "gate_proj", 0)
  if removal != "none":
    shard_lib = (*shard_lib, lib.weights.shared["gate_proj"][0])
  x = np.zeros((batch, tokens, 64), np.float32)
  mask = np.ones((batch, n), bool)
  index, fixed = np.arange(batch, dtype=np.int32), np.zeros(batch, np.int32)
  if phase == "per_token":
    args = (HLO_SPECS, index, x, shard_lib, mask, fixed, lib.sharding)
    compiled = _sharded.lower(*args).compile()
  else:
    C, M = request.state_dims(REQUEST_SPECS, n)
    state = None
    if phase == "state":
      state = {
        "cand": np.zeros((batch, C), np.int32),
        "ids": np.zeros((batch, M), np.int32),
        "weights": np.full((batch, M), 0.5, np.float32),
      }
    span = np.ones((batch, tokens), bool) if phase == "resolving" else None
    args = (REQUEST_SPECS, index, x, shard_lib, mask, fixed, lib.sharding, 0, span, state, C)
    compiled = _sharded_request.lower(*args).compile()
  fields = ("a", "b", "arrows", "valid")
  shard_bytes = {f: leaf.addressable_shards[0].data.nbytes for f, leaf in zip(fields, shard_lib)}
  return hlo_collectives(compiled.as_text()), shard_bytes


@pytest.mark.parametrize(
  "phase, removal",
  [("per_token", "none"), ("per_token", "top:1"), ("resolving", "top:1"), ("state", "none")],
)
def test_collectives_are_small_and_independent_of_n(phase, removal):
  small, shard_bytes = _collectives(512, phase, removal)
  large, _ = _collectives(1024, phase, removal)
  assert {c["kind"] for c in small} <= {"all-gather", "all-reduce"}
  # What crosses devices depends on B, T, k and O, never on N.
  assert [(c["kind"], c["operands"]) for c in small] == [(c["kind"], c["operands"]) for c in large]
  # Smaller than any float leaf of one device's share of this layer's library.
  biggest = max(c["operand_bytes"] for c in small)
  assert biggest < min(shard_bytes["a"], shard_bytes["b"], shard_bytes["arrows"]), (
    biggest,
    shard_bytes,
  )


def test_hlo_collective_parser():
  text = """
  %p = f32[2,3]{1,0} parameter(0)
  %q = s32[4]{0} parameter(1)
  %ag = f32[2,24]{1,0} all-gather(%p), channel_id=1, dimensions={1}
  %ar = (f32[2,3]{1,0}, s32[4]{0}) all-reduce(%p, %q), to_apply=%add
  %ars = f32[2,3]{1,0} all-reduce-start(%p), to_apply=%add
  %ard = f32[2,3]{1,0} all-reduce-done(%ars)
  ROOT %cp = bf16[8]{0} collective-permute(bf16[8]{0} %r), source_target_pairs={{0,1}}
  """
  found = hlo_collectives(text)
  kinds = ["all-gather", "all-reduce", "all-reduce", "collective-permute"]
  assert [c["kind"] for c in found] == kinds
  assert [c["operand_bytes"] for c in found] == [24, 40, 24, 16]
  assert found[1]["largest_operand_bytes"] == 24
  assert found[0]["result_bytes"] == 192 and found[1]["operands"] == ["f32[2,3]", "s32[4]"]


# --- Inside the model -----------------------------------------------------------------

KNOWLEDGE_SPECS = (
  RouterSpec("lag", k=3),
  RouterSpec("spectr"),
  RouterSpec("arrow_softmax", k=2),
  RouterSpec("uniform"),
)
TASK_SPECS = (RouterSpec("fixed"), RouterSpec("arrow"), RouterSpec("lag", k=2), RouterSpec("none"))
TASK_MODULES = ("q_proj", "v_proj", "o_proj")


@functools.cache
def models():
  """The tiny checkpoint on one device and replicated over the 8-device mesh."""
  return load_model(tiny_checkpoint()), load_model(tiny_checkpoint(), mesh=mesh())


def hooks(knowledge, task, k_specs=KNOWLEDGE_SPECS, t_specs=TASK_SPECS, batch=4):
  """(single-device hook, sharded hook); request b uses router b % len(specs)."""
  mask = np.ones((batch, len(knowledge)), bool)
  mask[1, : len(knowledge) // 2] = False
  out = []
  sharded = (shard_library(knowledge, mesh()), shard_library(task, mesh()))
  for k_lib, t_lib in ((knowledge, task), sharded):
    k_index, t_index = np.arange(batch) % len(k_specs), np.arange(batch) % len(t_specs)
    out.append(
      RoutedAdapters(
        (
          routed(k_lib, batch, k_specs, mask=mask, router_index=k_index),
          routed(t_lib, batch, t_specs, fixed_ids=[1, -1, 4, 2], router_index=t_index),
        )
      )
    )
  return out


def test_model_forward_matches_single_device_and_moves_no_library():
  """512 knowledge adapters on the MLP (64 per device) and 5 task adapters on
  attention (padded to 8: three devices hold only padding)."""
  from flax import nnx

  single_model, mesh_model = models()
  single, sharded = hooks(
    random_library(512, MLP_MODULES, seed=4), random_library(5, TASK_MODULES, rank=8, seed=5)
  )
  tokens = np.random.default_rng(0).integers(0, 256, (4, 7)).astype(np.int32)
  positions = np.broadcast_to(np.arange(7, dtype=np.int32), tokens.shape)
  g, state = nnx.split(single_model)
  logits1, _, aux1 = jitted_forward(g, state, tokens, positions, None, single)
  g, state = nnx.split(mesh_model)
  compiled = jitted_forward.lower(g, state, tokens, positions, None, sharded).compile()
  logits8, _, aux8 = compiled(state, tokens, positions, None, sharded)
  np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), atol=ATOL, rtol=0)
  assert jax.tree.structure(aux8) == jax.tree.structure(aux1)
  for c8, c1 in zip(jax.tree.leaves(aux8), jax.tree.leaves(aux1)):
    np.testing.assert_array_equal(np.asarray(c8), np.asarray(c1))
  assert (np.asarray(aux1["up_proj"][0])[:, :3] >= 0).all()  # row 3: uniform
  # One device's share of the knowledge library at one layer and module.
  w = sharded.libraries[0].weights
  shard = min(
    sum(getattr(w, f)[m].addressable_shards[0].data.nbytes // L for f in ("a", "b", "arrows"))
    for m in MLP_MODULES
  )
  found = hlo_collectives(compiled.as_text())
  assert found and max(c["largest_operand_bytes"] for c in found) < shard / 4, (found, shard)


def test_generate_with_a_sharded_library_matches_single_device():
  single_model, mesh_model = models()
  # Decode-shaped routing (T = 1: lag gathers its candidates); fewer routers than the
  # forward test above, which covers them all in the model, to keep compiles short.
  single, sharded = hooks(
    random_library(10, MLP_MODULES, seed=6),
    random_library(5, TASK_MODULES, rank=8, seed=7),
    (RouterSpec("lag", k=3), RouterSpec("arrow_softmax", k=2)),
    (RouterSpec("fixed"), RouterSpec("spectr")),
  )
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43], [7]]
  kw = dict(max_new_tokens=4, return_logits=True, return_routing=True)
  out1 = generate(single_model, prompts, lora=single, **kw)
  out8 = generate(mesh_model, prompts, lora=sharded, **kw)
  assert out8.tokens == out1.tokens
  for l8, l1 in zip(out8.logits, out1.logits):
    np.testing.assert_allclose(l8, l1, atol=ATOL, rtol=0)
  for c8, c1 in zip(jax.tree.leaves(out8.routing), jax.tree.leaves(out1.routing)):
    np.testing.assert_array_equal(c8, c1)  # prefill and decode positions
  assert max(len(t) for t in out1.tokens) == 4


def test_cli_generate_with_the_adapter_axis_over_8_devices(tmp_path):
  """The vote with shared directions removed, on a library split over 8 devices."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "device_count=8" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "lag_jax.run",
      "--config=configs/generate.py:tiny_lag",
      "--config.mesh.adapter=8",
      "--config.router=vote",
      "--config.shared_removal=top:1",
      "--config.generation.max_new_tokens=3",
      f"--workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sharded over 8 devices" in proc.stderr
  results = json.loads((tmp_path / "generations.json").read_text())
  assert len(results) == 2 and all(r["num_tokens"] > 0 for r in results)
  routing = np.load(tmp_path / "routing.npz")
  ids = routing["lib0/gate_proj"]  # [prompts, L, T]
  assert ((ids >= 0) & (ids < 8)).any() and ids.max() < 8  # never a padding id
  for row in ids:  # the vote: one adapter for every layer and position of a request
    assert len(np.unique(row[row >= 0])) == 1
  assert routing["lib1/q_proj"].max() < 3
