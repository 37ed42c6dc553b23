"""Votes in two rounds (``vote_finalists``) and votes over some modules
(``vote_modules``): the three passes inside the model against the float64 reference
hook, the state each pass resolves against a recount, generate's three prefills (the
winners' output equals the fixed router with them, bit for bit), the identity of a
two-round vote over every adapter with a vote at k = N, and bad input. Every form of a
library: tests/test_routing_forms.py."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from reference import request as rr
from test_routing_beyond import (
  B_GEN,
  PROMPTS,
  RequestReferenceHook,
  library,
  model,  # noqa: F401 (a fixture)
)

from lag_jax.eval import harness
from lag_jax.generation.generate import generate
from lag_jax.model.transformer import MLP_MODULES
from lag_jax.routing import request
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.routers import RouterSpec
from lag_jax.testing import tiny_config
from lag_jax.testing.libraries import forward

ATOL = 1e-4
L = tiny_config().num_hidden_layers
N = 7

SPECS = (
  RouterSpec("vote", k=3, vote_finalists=2),
  RouterSpec("vote", k=2, vote_score="margin", vote_finalists=3, vote_modules=("down_proj",)),
  RouterSpec("vote", k=3, vote_score="score", vote_finalists=2, vote_scope="module"),
  RouterSpec("vote", k=3, vote_modules=("gate_proj", "up_proj")),  # one round
  RouterSpec("request_lag", k=3),
)


def _recount(specs, router_index, stats, B, previous=None):
  """request.resolve_state's definition, recounted from the reference hook's stats
  (module, layer) -> rows: after the first round the finalists (and, until the
  second, the first round's winners); after the second the winners among them."""
  K, M = request.state_dims(specs, N)
  F = request.finalist_width(specs, N)
  if previous is None:
    out = {
      m: dict(
        cand=np.full((L, B, K), -1),
        ids=np.full((L, B, M), -1),
        weights=np.zeros((L, B, M)),
        finalists=np.full((L, B, F), -1),
      )
      for m in MLP_MODULES
    }
  else:
    out = {
      m: {k: np.array(v) for k, v in previous[m].items() if k != "finalists"} for m in MLP_MODULES
    }
  for b in range(B):
    spec = specs[router_index[b]]
    if previous is None:
      for m in MLP_MODULES:
        for layer in range(L):
          c = stats[(m, layer)][b]["cand"]
          if c is not None:
            out[m]["cand"][layer, b, : len(c)] = c
    if not spec.votes or (previous is not None and not spec.two_rounds):
      continue
    counted = [m for m in MLP_MODULES if spec.vote_modules is None or m in spec.vote_modules]
    for m in MLP_MODULES:
      for layer in range(L):
        if spec.vote_scope == "all":
          v = sum(stats[(mm, ll)][b]["votes"] for mm in counted for ll in range(L))
        else:
          v = stats[(m, layer)][b]["votes"] * (m in counted)
        out[m]["ids"][layer, b], out[m]["weights"][layer, b] = rr.top_m(v, spec.vote_top_m, M)
        if previous is None and spec.two_rounds:
          out[m]["finalists"][layer, b] = rr.top_m(v, spec.vote_finalists, F)[0]
  return out


def _assert_state(state, want, keys):
  for m in MLP_MODULES:
    for key in keys:
      got = np.asarray(getattr(state, key)[m])
      if key == "weights":
        np.testing.assert_allclose(got, want[m][key], atol=1e-5, err_msg=f"{m} {key}")
      else:
        np.testing.assert_array_equal(got, want[m][key], err_msg=f"{m} {key}")


def _as_numpy(state):
  keys = ("cand", "ids", "weights") + (("finalists",) if state.finalists is not None else ())
  return {m: {k: np.asarray(getattr(state, k)[m]) for k in keys} for m in MLP_MODULES}


def test_three_passes_match_the_reference(model):  # noqa: F811
  """Round one (per-token LAG, votes), round two (each two-round row decides every
  span token among its finalists; the others apply their state) and the pass that
  applies the winners, through the model, against the reference hook; the state after
  each round against a recount."""
  B, T = 5, 7
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 256, (B, T))
  router_index = np.array([0, 1, 2, 3, 4])
  mask = np.ones((B, N), bool)
  mask[1, [0, 3]] = False
  mask[2, 6] = False
  span = rng.random((B, T)) < 0.7
  span[:, 2] = True
  hook = RoutedAdapters(
    (routed(library(), B, SPECS, mask=mask, router_index=router_index, span=span),)
  )
  assert hook.request_passes == 3
  states, ref_states, ref_stats = [], [], []
  state_ref = None
  for round_ in (1, 2):
    logits, _, aux = forward(model, tokens, hook)
    telemetry, (state,) = hook.split_aux(aux)
    hook_ref = RequestReferenceHook(SPECS, router_index, mask, span, state_ref)
    logits_ref, _, aux_ref = forward(model, tokens, hook_ref)
    assert hook_ref.tie > 1e-5, f"near tie in the test data (round {round_})"
    np.testing.assert_allclose(logits, logits_ref, atol=ATOL, rtol=0, err_msg=f"round {round_}")
    for m in MLP_MODULES:
      np.testing.assert_array_equal(np.asarray(telemetry[m][0]), np.asarray(aux_ref[m][0]))
    want = _recount(SPECS, router_index, hook_ref.stats, B, state_ref)
    _assert_state(state, want, ("cand", "ids", "weights") + (("finalists",) if round_ == 1 else ()))
    if round_ == 1:
      assert state.finalists is not None
    else:
      assert state.finalists is None
    states.append(state)
    ref_states.append(want)
    ref_stats.append(hook_ref.stats)
    hook = hook.with_request_state((state,))
    state_ref = _as_numpy(state)
  assert hook.request_passes == 0
  # The pass that applies the winners, against the reference applying them.
  logits3, _, aux3 = forward(model, tokens, hook)
  hook_ref = RequestReferenceHook(SPECS, router_index, mask, span, _as_numpy(states[1]))
  logits3_ref, _, aux3_ref = forward(model, tokens, hook_ref)
  np.testing.assert_allclose(logits3, logits3_ref, atol=ATOL, rtol=0)
  first, second = states
  for m in MLP_MODULES:
    np.testing.assert_array_equal(np.asarray(aux3[m][0]), np.asarray(aux3_ref[m][0]))
    fin = np.asarray(first.finalists[m])
    win = np.asarray(second.ids[m])
    for b in range(3):  # two-round rows: the winners are among their finalists
      for layer in range(L):
        assert set(win[layer, b][win[layer, b] >= 0]) <= set(fin[layer, b].tolist())
    # The one-round rows keep their first state.
    for key in ("ids", "weights", "cand"):
      np.testing.assert_array_equal(
        np.asarray(getattr(second, key)[m])[:, 3:], np.asarray(getattr(first, key)[m])[:, 3:]
      )
  # Not vacuous: row 1 counts down_proj alone, and a count over every module would
  # have chosen other finalists; the second round changed some row's winner.
  every_module = (*SPECS[:1], dataclasses.replace(SPECS[1], vote_modules=None), *SPECS[2:])
  every = _recount(every_module, router_index, ref_stats[0], B)
  fin1 = ref_states[0]["up_proj"]["finalists"][:, 1]
  assert not np.array_equal(every["up_proj"]["finalists"][:, 1], fin1)
  assert any(
    not np.array_equal(np.asarray(first.ids[m])[:, :3], np.asarray(second.ids[m])[:, :3])
    for m in MLP_MODULES
  )


def _hook(specs, rows=None, fixed=None, span=None):
  rows = list(range(B_GEN)) if rows is None else rows
  return RoutedAdapters(
    (
      routed(
        library(),
        B_GEN,
        specs,
        fixed_ids=None if fixed is None else np.asarray(fixed),
        router_index=np.asarray(rows),
        span=span,
      ),
    )
  )


def _gen(model, hook):  # noqa: F811
  return generate(
    model, PROMPTS, max_new_tokens=4, lora=hook, return_logits=True, return_routing=True
  )


GEN_SPECS = (
  RouterSpec("vote", k=3, vote_score="margin", vote_finalists=2),
  RouterSpec("fixed"),
)


def test_generate_runs_three_prefills_and_applies_the_winner(model):  # noqa: F811
  """generate: three prefills; the output is the fixed router's with the winners, bit
  for bit (the cache holds what the winners computed); the winner is among the
  first round's two finalists."""
  out = _gen(model, _hook(GEN_SPECS, [0] * B_GEN))
  assert out.prefill_passes == 3
  ids = out.routing["up_proj"][0]  # [B, L, S]
  winners = [int(ids[b, 1, 0]) for b in range(B_GEN)]
  for b, p in enumerate(PROMPTS):
    assert (ids[b, 1, : len(p) + len(out.tokens[b]) - 1] == winners[b]).all()
  fixed = _gen(model, _hook(GEN_SPECS, [1] * B_GEN, fixed=winners))
  # (The batch's routers include two-round votes: every row runs the three prefills,
  # and rows of other routers route alike in each.)
  assert fixed.prefill_passes == 3 and out.tokens == fixed.tokens
  for a, b in zip(out.logits, fixed.logits, strict=True):
    np.testing.assert_array_equal(a, b)
  # Round one's finalists, from its own resolving pass.
  hook = _hook(GEN_SPECS, [0] * B_GEN)
  T = max(len(p) for p in PROMPTS)
  tokens = np.stack([np.pad(p, (0, T - len(p))) for p in PROMPTS])
  hook = hook.for_prompts(np.arange(T)[None] < np.array([len(p) for p in PROMPTS])[:, None])
  _, _, aux = forward(model, tokens, hook)
  _, (first,) = hook.split_aux(aux)
  for b in range(B_GEN):
    assert winners[b] in np.asarray(first.finalists["up_proj"])[1, b].tolist()


def test_two_rounds_over_every_adapter_repeat_a_vote_at_k_n(model):  # noqa: F811
  """With k = N and score votes every usable adapter gets votes, so every one is a
  finalist: the second round's decisions (SpectR among the finalists) are the first
  round's (SpectR over the library), and so are its votes, winners and output."""
  one = _gen(model, _hook((RouterSpec("vote", k=N, vote_score="score"),), [0] * B_GEN))
  spec = RouterSpec("vote", k=N, vote_score="score", vote_finalists=N)
  two = _gen(model, _hook((spec,), [0] * B_GEN))
  assert (one.prefill_passes, two.prefill_passes) == (2, 3)
  assert one.tokens == two.tokens
  for a, b in zip(one.logits, two.logits, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  for m in MLP_MODULES:
    np.testing.assert_array_equal(one.routing[m][0], two.routing[m][0])


def test_bad_vote_options():
  with pytest.raises(ValueError, match="applies to 'vote' only"):
    RouterSpec("request_lag", vote_finalists=2)
  with pytest.raises(ValueError, match="vote_finalists must be >= 0"):
    RouterSpec("vote", vote_finalists=-1)
  with pytest.raises(ValueError, match="exceeds vote_finalists"):
    RouterSpec("vote", vote_finalists=2, vote_top_m=3)
  with pytest.raises(ValueError, match="names no module"):
    RouterSpec("vote", vote_modules=())
  with pytest.raises(ValueError, match=r"vote_modules \['o_proj'\] are not modules"):
    routed(library(), 1, RouterSpec("vote", vote_modules=("o_proj", "down_proj")))
  assert RouterSpec("vote", vote_finalists=1).two_rounds is False  # 0 and 1: one round
  assert RouterSpec("vote", vote_modules=("up_proj", "down_proj")).vote_modules == (
    "down_proj",
    "up_proj",
  )


def test_method_names_and_the_generate_job():
  m = harness.method_from_name("Vote-score(k=4;finalists=2;vote_modules=down_proj+up_proj)")
  assert dict(m.knowledge_options) == {
    "vote_score": "score",
    "vote_finalists": 2,
    "vote_modules": ("down_proj", "up_proj"),
  }
  # The modules are the knowledge library's; the task library's differ.
  assert "vote_modules" not in dict(m.task_options)
  spec = harness.router_spec(m.knowledge, m.k, m.knowledge_options, 30)
  assert spec.two_rounds and spec.vote_modules == ("down_proj", "up_proj")
  assert dict(harness.method_from_name("Vote-final2").knowledge_options) == {"vote_finalists": 2}
  with pytest.raises(ValueError, match="exceeds vote_finalists"):
    harness.method_from_name("Vote(finalists=2;m=3)")

  import importlib.util
  import pathlib

  from lag_jax.errors import ConfigError
  from lag_jax.jobs.generate import _router_spec

  path = pathlib.Path(__file__).parents[1] / "configs" / "generate.py"
  spec = importlib.util.spec_from_file_location("generate_config", path)
  generate_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(generate_config)
  c = generate_config.get_config("tiny_lag")
  c.vote_finalists = 2
  c.vote_modules = "down_proj"
  assert _router_spec(c, "vote") == RouterSpec(
    "vote", k=c.k, vote_finalists=2, vote_modules=("down_proj",)
  )
  assert _router_spec(c, "lag").vote_finalists == 0  # a vote's option only
  c.vote_finalists = -2
  with pytest.raises(ConfigError, match="'vote_finalists'"):
    _router_spec(c, "vote")


def test_state_pads_its_finalists():
  st = request.RequestState(
    cand={"m": jnp.zeros((2, 1, 1), jnp.int32)},
    ids={"m": jnp.zeros((2, 1, 1), jnp.int32)},
    weights={"m": jnp.ones((2, 1, 1))},
    finalists={"m": jnp.zeros((2, 1, 2), jnp.int32)},
  )
  padded = st.pad_batch(2)
  assert padded.finalists["m"].shape == (2, 3, 2)
  assert (np.asarray(padded.finalists["m"])[:, 1:] == -1).all()
