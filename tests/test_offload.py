"""Offloaded library (A* / B* on the host, arrows on the device, a device cache):
the same ids and outputs as the resident library for every supported router, one
layer at a time and through ``generate`` (prefill and decode); the LRU directory and
the hit / miss / byte counters; files on disk (bfloat16 round trip); bad input."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lag_jax.adapters import AdapterError, load_peft_adapter
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.errors import IntegrityError
from lag_jax.generation import generate
from lag_jax.routing import core, routers
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.library import AdapterLibrary
from lag_jax.routing.offload import (
  OffloadedLibrary,
  OffloadWriter,
  SlotDirectory,
  save_offloaded,
)
from lag_jax.routing.routers import LayerLibrary, RouterSpec
from lag_jax.testing import libraries, tiny_checkpoint, tiny_config

# Offloaded and resident deltas are the same float32 sums in another order (SpectR
# streams 5-adapter chunks; the resident one is dense): they agree to a few ulp of the
# outputs' magnitude. The bound is 1e-6 times that magnitude (at least 1): a bare 1e-6
# is 2 ulp at |delta| ~ 7 and failed on an AMD EPYC host (3 ulp), where XLA:CPU picks
# other kernels than on the machine it was chosen on.
ATOL = 1e-6


def assert_same_delta(got, want, err_msg=""):
  want = np.asarray(want)
  scale = max(1.0, float(np.abs(want).max(initial=0.0)))
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL * scale, rtol=0, err_msg=err_msg)


CFG = tiny_config()  # hidden 64, intermediate 128, 2 layers
L = CFG.num_hidden_layers


def random_library(n, modules, **kw) -> AdapterLibrary:
  """A synthetic library in the stored layout (``testing.libraries.random_library``)."""
  return libraries.random_library(n, libraries.module_shapes(CFG, modules), L, **kw)


# --- The slot directory --------------------------------------------------------------


def test_slot_directory_lru_and_counters():
  d = SlotDirectory(4)
  slots, miss_slots, miss_ids = d.assign(0, np.array([1, 2, 3]))
  assert slots.tolist() == [0, 1, 2] and miss_ids.tolist() == [1, 2, 3]
  assert miss_slots.tolist() == [0, 1, 2]
  # 2 and 3 hit (and become most recent); 4 takes the free slot, 5 evicts id 1.
  slots, miss_slots, miss_ids = d.assign(0, np.array([2, 3, 4, 5]))
  assert slots.tolist() == [1, 2, 3, 0] and miss_ids.tolist() == [4, 5]
  s = d.stats
  assert (s.calls, s.hits, s.misses, s.evictions) == (2, 2, 5, 1)
  # Keys are (layer, id): id 2 of layer 1 is not id 2 of layer 0. LRU order now
  # 2, 3, 4, 5 (oldest first): 2 is evicted for it.
  slots, _, miss_ids = d.assign(1, np.array([2]))
  assert miss_ids.tolist() == [2] and slots.tolist() == [1]
  assert d.assign(0, np.array([3, 4, 5]))[2].size == 0  # all still cached
  assert d.stats.hits == 5 and d.stats.evictions == 2
  with pytest.raises(ValueError, match="more than the cache's 4 slots"):
    d.assign(0, np.arange(5))
  d.clear()
  assert d.assign(0, np.array([3]))[2].tolist() == [3]


# --- One layer: every router against the resident library -----------------------------

N = 12
ROUTERS = (
  RouterSpec("none"),
  RouterSpec("fixed"),
  RouterSpec("arrow"),
  RouterSpec("arrow_softmax", k=3),
  RouterSpec("lag", k=3),  # B T k > N: dense over the whole A*, as the resident one
  RouterSpec("lag", k=N + 5),  # clamped to N: SpectR
  RouterSpec("lag", k=3, projection="grouped"),  # (gather: the counter test below)
  RouterSpec("spectr"),
  RouterSpec("uniform"),  # streams every adapter's A* and B*
)


@functools.partial(jax.jit, static_argnames=("module",))
def _resident(lib, x, mask, fixed, *, module):
  """Every router over the whole batch; lib = this layer's (a, b, arrows, valid)."""
  del module
  return [routers.route(spec, x, LayerLibrary(*lib), mask, fixed) for spec in ROUTERS]


@functools.partial(jax.jit, static_argnames=("module",))
def _offloaded(o, layer, x, *, module):
  """Every router of ``o`` over the whole batch, in one program (one argument holds the
  caches: each router is the same library with another router)."""
  out = []
  for spec in o.routers:
    d, c, _ = o.replace(routers=(spec,)).route(module, x, o.at_layer(layer))
    out.append((d, c))
  return out


def run_offloaded(olib, module, layer, x, specs, **kw):
  o = routed(olib, x.shape[0], specs, router_index=np.zeros(x.shape[0], int), **kw)
  return _offloaded(o, jnp.int32(layer), x, module=module)


def test_every_router_matches_resident_one_layer():
  lib = random_library(N, ("up_proj", "down_proj"), invalid=(4,), seed=1)
  # 12 slots (the least a [3, 5] call can need at k >= 3), shared by 2 layers: evictions;
  # 5-row chunks and 5-adapter SpectR chunks: several transfers, a padded last one.
  olib = OffloadedLibrary.from_library(lib, slots=N, b_slots=N, chunk_rows=5, stream_chunk=5)
  rng = np.random.default_rng(0)
  B, T = 3, 5
  mask = np.ones((B, N), bool)
  mask[1, :6] = False  # row 1 may use ids 6..11 only
  mask[2] = False
  mask[2, [4, 9]] = True  # row 2: the invalid id 4 and id 9
  fixed = np.array([3, -1, 4], np.int32)  # row 2 asks for the invalid adapter
  for module in ("up_proj", "down_proj"):
    I = CFG.module_shapes()[module][1]
    for layer in (0, 1, 0):
      x = jnp.asarray(rng.normal(size=(B, T, I)), jnp.float32)
      w = lib.weights
      llib = tuple(getattr(w, f)[module][layer] for f in ("a", "b", "arrows", "valid"))
      want = _resident(llib, x, jnp.asarray(mask), jnp.asarray(fixed), module=module)
      got = run_offloaded(olib, module, layer, x, ROUTERS, mask=mask, fixed_ids=fixed)
      for spec, (d0, c0), (d1, c1) in zip(ROUTERS, want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(c1), np.asarray(c0), err_msg=str(spec))
        assert_same_delta(d1, d0, err_msg=str(spec))
        if spec.name not in ("none",):
          assert (np.asarray(c0)[2] != 4).all()  # never the invalid adapter
  stats = olib.stats()
  assert stats["total"].hits > 0 and stats["total"].misses > 0
  assert stats["total"].evictions > 0
  # Three layer calls, each streaming every adapter's A* (SpectR) and A* and B* (uniform).
  assert stats["stream/up_proj"].streamed_rows == 3 * 3 * N


# --- Counters --------------------------------------------------------------------------


def test_hits_misses_and_bytes_of_a_repeated_call():
  module = "up_proj"
  lib = random_library(N, (module,), seed=2)
  olib = OffloadedLibrary.from_library(lib, slots=N, b_slots=8, chunk_rows=4)
  spec = RouterSpec("lag", k=3)
  B, T, I = 1, 3, CFG.module_shapes()[module][1]  # B T k = 9 < N: candidates are gathered
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, I)), jnp.float32)
  ((d1, c1),) = run_offloaded(olib, module, 1, x, (spec,))
  view = core.Resident(None, None, olib.arrows[module][1], olib.valid[module][1])
  _, cand = view.top_k(core.arrow_scores(x, view, jnp.ones((B, N), bool)), 3)
  n_cand, n_sel = len(np.unique(np.asarray(cand))), len(np.unique(np.asarray(c1)))
  s = olib.stats()
  a, b = s[f"a/{module}"], s[f"b/{module}"]
  R, O = lib.rank, CFG.module_shapes()[module][0]
  assert (a.calls, a.hits, a.misses) == (1, 0, n_cand)
  assert (b.calls, b.hits, b.misses) == (1, 0, n_sel)
  assert a.chunks == -(-n_cand // 4) and a.bytes_moved == a.chunks * 4 * R * I * 4
  assert a.bytes_needed == n_cand * R * I * 4 and b.bytes_needed == n_sel * O * R * 4
  # The same call again: everything is cached, nothing moves, the same result.
  ((d2, c2),) = run_offloaded(olib, module, 1, x, (spec,))
  np.testing.assert_array_equal(np.asarray(d2), np.asarray(d1))
  np.testing.assert_array_equal(np.asarray(c2), np.asarray(c1))
  s2 = olib.stats()
  assert (s2[f"a/{module}"].hits, s2[f"a/{module}"].misses) == (n_cand, n_cand)
  assert s2[f"b/{module}"].hits == n_sel and s2["total"].bytes_moved == s["total"].bytes_moved
  assert s2["total"].hit_rate == 0.5
  olib.reset_stats()
  olib.clear_cache()
  run_offloaded(olib, module, 1, x, (spec,))
  assert olib.stats()["total"].hits == 0 and olib.stats()["total"].misses == n_cand + n_sel


# --- Through generate: prefill and decode -----------------------------------------------


def test_generate_matches_resident_library(tmp_path):
  model = load_model(tiny_checkpoint())
  # Two of the MLP modules and one attention module keep the compiles short.
  knowledge = random_library(10, ("up_proj", "down_proj"), invalid=(7,), seed=3)
  task = random_library(4, ("v_proj",), rank=8, seed=4)
  save_offloaded(knowledge, tmp_path / "lib")
  # A cache of N slots per module for 2 layers: layers evict each other's adapters.
  olib = OffloadedLibrary.open(tmp_path / "lib", slots=10, chunk_rows=3, stream_chunk=4)
  # arrow_softmax runs in the one-layer test above (compiles cost most of this test).
  specs = (RouterSpec("lag", k=3), RouterSpec("arrow"), RouterSpec("spectr"), RouterSpec("fixed"))
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43], [7]]
  B = len(prompts)
  mask = np.ones((B, 10), bool)
  mask[1, :5] = False
  kw = dict(mask=mask, fixed_ids=[0, 1, 2, 3], router_index=np.arange(B) % len(specs))
  t_routed = routed(task, B, RouterSpec("fixed"), fixed_ids=[1, -1, 3, 0])
  resident = RoutedAdapters((routed(knowledge, B, specs, **kw), t_routed))
  offloaded = RoutedAdapters((routed(olib, B, specs, **kw), t_routed))
  gen = dict(max_new_tokens=5, return_logits=True, return_routing=True)
  want = generate(model, prompts, lora=resident, **gen)
  got = generate(model, prompts, lora=offloaded, **gen)
  assert got.tokens == want.tokens
  for g, w in zip(got.logits, want.logits, strict=True):
    np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)
  assert jax.tree.structure(got.routing) == jax.tree.structure(want.routing)
  for g, w in zip(jax.tree.leaves(got.routing), jax.tree.leaves(want.routing), strict=True):
    np.testing.assert_array_equal(g, w)  # prefill and decode positions
  ids = np.asarray(got.routing["up_proj"][0])
  assert (ids[:, :, :3] >= 0).all() and (ids != 7).all()
  total = olib.stats()["total"]
  assert total.hits > 0 and total.misses > 0 and total.evictions > 0
  # A second request batch reuses the cache (the same prompts: decode positions hit).
  before = olib.stats()["total"]
  again = generate(model, prompts, lora=offloaded, **gen)
  assert again.tokens == want.tokens
  after = olib.stats()["total"]
  assert after.hits - before.hits > 0


@pytest.mark.parametrize("kind", ["index", "sketch"])
def test_arrow_filters_on_an_offloaded_library_match_the_resident_one(tmp_path, monkeypatch, kind):
  """LAG through the arrow index (``with_index``, RouterSpec(index_probe)) or the arrow
  sketch (``with_sketch``, RouterSpec(index_sketch, index_probe)) on an offloaded
  library: the same index / sketch as the resident library's, and the resident
  library's ids and logits, prefill (exact scan) and decode (the index: 2 tokens x 2
  clusters of 8 < 40 arrows; the sketch: a pool of 6 of 40)."""
  from lag_jax.routing import arrow_index, arrow_sketch
  from lag_jax.routing.offload import remove_shared_offloaded

  model = load_model(tiny_checkpoint())
  knowledge = random_library(40, ("up_proj",), invalid=(7,), seed=5)
  save_offloaded(knowledge, tmp_path / "lib")
  olib = OffloadedLibrary.open(tmp_path / "lib", slots=40, chunk_rows=8)
  if kind == "index":
    resident, offloaded = knowledge.with_index(clusters=8), olib.with_index(clusters=8)
    module, spec = arrow_index, RouterSpec("lag", k=3, index_probe=2)
  else:
    resident, offloaded = knowledge.with_sketch(4), olib.with_sketch(4)
    module, spec = arrow_sketch, RouterSpec("lag", k=3, index_sketch=4, index_probe=6)
  for r, o in zip(
    jax.tree.leaves(resident.weights.index), jax.tree.leaves(offloaded.index), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(o), np.asarray(r))  # the same clusters / sketch
  calls = []
  real = module.search
  monkeypatch.setattr(module, "search", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  prompts = [[5, 6, 7, 8], [11, 12, 13]]
  gen = dict(max_new_tokens=4, return_logits=True, return_routing=True)
  want = generate(model, prompts, lora=RoutedAdapters((routed(resident, 2, spec),)), **gen)
  assert calls  # the decode steps read the index / sketch
  calls.clear()
  got = generate(model, prompts, lora=RoutedAdapters((routed(offloaded, 2, spec),)), **gen)
  assert calls
  assert got.tokens == want.tokens
  for g, w in zip(got.logits, want.logits, strict=True):
    np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)
  for g, w in zip(jax.tree.leaves(got.routing), jax.tree.leaves(want.routing), strict=True):
    np.testing.assert_array_equal(g, w)
  with pytest.raises(ValueError, match=f"needs a library with an arrow {kind}"):
    generate(model, prompts, lora=RoutedAdapters((routed(olib, 2, spec),)), max_new_tokens=2)
  with pytest.raises(ValueError, match="remove shared directions first"):
    remove_shared_offloaded(offloaded, "top", 1, np.ones(40, bool))


# --- Files and bad input ----------------------------------------------------------------


def test_bfloat16_files_round_trip(tmp_path):
  lib = random_library(6, ("gate_proj",), seed=5, dtype=jnp.bfloat16)
  save_offloaded(lib, tmp_path / "bf16")
  olib = OffloadedLibrary.open(tmp_path / "bf16", slots=6)
  a = olib.host.factors["a"]["gate_proj"]
  assert isinstance(a, np.memmap) and a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(a), np.asarray(lib.weights.a["gate_proj"]))
  np.testing.assert_array_equal(
    np.asarray(olib.arrows["gate_proj"]), np.asarray(lib.weights.arrows["gate_proj"])
  )
  assert olib.host_nbytes() == sum(
    lib.weights.a[m].nbytes + lib.weights.b[m].nbytes for m in lib.modules
  )
  dev = olib.device_nbytes()
  assert dev["caches"] == 7 * 4 * 64 * 2 + 7 * 128 * 4 * 2  # 6 slots + scratch, a and b
  # bfloat16 rows go through the uint16 cache bit for bit: the resident result exactly.
  spec = RouterSpec("lag", k=2)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 64)), jnp.float32)
  w = lib.weights
  llib = LayerLibrary(*(getattr(w, f)["gate_proj"][1] for f in ("a", "b", "arrows", "valid")))
  d0, c0 = routers.route(spec, x, llib, jnp.ones((1, 6), bool), jnp.full((1,), -1, jnp.int32))
  ((d1, c1),) = run_offloaded(olib, "gate_proj", 1, x, (spec,))
  np.testing.assert_array_equal(np.asarray(c1), np.asarray(c0))
  np.testing.assert_array_equal(np.asarray(d1), np.asarray(d0))


def test_bad_input(tmp_path):
  lib = random_library(5, ("up_proj", "down_proj"), seed=6)
  with pytest.raises(AdapterError, match="offload.json missing"):
    OffloadedLibrary.open(tmp_path, slots=4)
  save_offloaded(lib, tmp_path / "ok")
  os.remove(tmp_path / "ok" / "up_proj.b.npy")
  with pytest.raises(IntegrityError, match=r"module 'up_proj': .*up_proj\.b\.npy is missing"):
    OffloadedLibrary.open(tmp_path / "ok", slots=4)
  save_offloaded(lib, tmp_path / "bad")
  np.save(tmp_path / "bad" / "down_proj.a.npy", np.zeros((L, 4, 4, 128), np.float32))
  with pytest.raises(
    IntegrityError, match=r"module 'down_proj'.*\[2, 4, 4, 128\].*\[2, 5, 4, 128\]"
  ):
    OffloadedLibrary.open(tmp_path / "bad", slots=4)

  def writer():
    return OffloadWriter(tmp_path / "w", ["x", "y"], {"up_proj": (128, 64)}, num_layers=L, rank=4)

  a, b = np.zeros((L, 1, 4, 64)), np.zeros((L, 1, 128, 4))
  with pytest.raises(AdapterError, match=r"module 'up_proj' b chunk has shape"), writer() as w:
    w.write("up_proj", 0, a, b.swapaxes(2, 3))
  with (
    pytest.raises(AdapterError, match=r"never written, by module: \{'up_proj': 1\}"),
    writer() as w,
  ):
    w.write("up_proj", 0, a, b)
  assert not (tmp_path / "w").exists() and not list(tmp_path.glob(".tmp-offload-*"))
  olib = OffloadedLibrary.from_library(lib, slots=4)
  with pytest.raises(ValueError, match=r"routing mask has shape"):
    routed(olib, 2, RouterSpec("lag", k=2), mask=np.ones((2, 4), bool))
  # A [2, 3] call at k = 2 may need all 5 adapters at once: 4 slots cannot hold them.
  x = jnp.zeros((2, 3, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"module 'up_proj'.*5 candidates' A\*.*4 a slots"):
    run_offloaded(olib, "up_proj", 0, x, (RouterSpec("lag", k=2),))


@pytest.mark.parametrize("where", ["host", "files"])
def test_cli_vote_with_removal_on_an_offloaded_library(tmp_path, where):
  """``--config.router=vote --config.shared_removal=top:1`` with the knowledge library's
  factors in host memory (offload=host) or in a folder written by save_offloaded
  (memory-mapped; the shared directions cached beside it)."""
  from cli import run_cli

  from lag_jax import testing

  args = ["--config=configs/generate.py:tiny_lag", "--config.router=vote"]
  args += ["--config.shared_removal=top:1", "--config.generation.max_new_tokens=3"]
  if where == "host":
    args += ["--config.offload=host", "--config.offload_slots=8"]
  else:
    folder = tmp_path / "offloaded"
    lib = AdapterLibrary.from_adapters(
      [load_peft_adapter(p) for p in sorted(testing.tiny_adapters("knowledge").iterdir())],
      CFG,
    )
    save_offloaded(lib, folder)
    args += [f"--config.library={folder}"]
  proc = run_cli(*args, f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "generations.json").read_text())
  assert len(results) == 2 and all(r["num_tokens"] > 0 for r in results)
  ids = np.load(tmp_path / "run" / "routing.npz")["lib0/gate_proj"]
  assert ids.max() < 8 and (ids >= 0).any()
  for row in ids:  # one adapter per request
    assert len(np.unique(row[row >= 0])) == 1
  if where == "files":
    assert list((folder / "shared").glob("top-1-*.safetensors"))


def test_shared_removal_is_cached_beside_the_library(tmp_path):
  """The streamed removal equals the resident one; a second open reads it from
  <folder>/shared (no factor is streamed); a rewritten library computes anew."""
  from lag_jax.routing.shared import remove_shared

  lib = random_library(9, ("up_proj",), seed=8)
  want, _ = remove_shared(lib, "top:2")
  save_offloaded(lib, tmp_path / "lib")
  first, _ = remove_shared(
    OffloadedLibrary.open(tmp_path / "lib", slots=9, stream_chunk=4), "top:2"
  )
  for got in (first.arrows, first.shared):
    assert set(got) == {"up_proj"}
  np.testing.assert_allclose(
    np.asarray(first.arrows["up_proj"]), np.asarray(want.weights.arrows["up_proj"]), atol=1e-5
  )
  w0, w1 = np.asarray(first.shared["up_proj"]), np.asarray(want.weights.shared["up_proj"])
  np.testing.assert_allclose(w0 @ w0.swapaxes(1, 2), w1 @ w1.swapaxes(1, 2), atol=1e-5)
  (cached,) = (tmp_path / "lib" / "shared").glob("top-2-*.safetensors")
  again = OffloadedLibrary.open(tmp_path / "lib", slots=9)
  again.host.factors = {"a": {}, "b": {}}  # nothing may be read: the cache answers
  second, _ = remove_shared(again, "top:2")
  np.testing.assert_array_equal(
    np.asarray(second.arrows["up_proj"]), np.asarray(first.arrows["up_proj"])
  )
  # Another library in the same folder, with the old cache file put back: the manifest
  # (its digests) differs from the cache's fingerprint, so it is computed anew.
  stale = cached.read_bytes()
  other = random_library(9, ("up_proj",), seed=9)
  save_offloaded(other, tmp_path / "lib")
  (tmp_path / "lib" / "shared").mkdir()
  cached.write_bytes(stale)
  third, _ = remove_shared(OffloadedLibrary.open(tmp_path / "lib", slots=9), "top:2")
  want3, _ = remove_shared(other, "top:2")
  np.testing.assert_allclose(
    np.asarray(third.arrows["up_proj"]), np.asarray(want3.weights.arrows["up_proj"]), atol=1e-5
  )
  assert cached.read_bytes() != stale  # rewritten for the new library
