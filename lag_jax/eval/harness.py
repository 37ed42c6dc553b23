"""The evaluation harness: every method on the same prompts, batched, scored alike.

Its parts, by job: ``eval/methods.py`` (method names and parsing), ``eval/prompts.py``
(prompts and spans), ``eval/runner.py`` (running a method, scores, routing accuracy),
``eval/report.py`` (the normalised table and plots). This module gathers them.

A *method* says where knowledge comes from (no adapter, the gold adapter, a router
over the knowledge library, the BM25-top document's adapter, or the BM25-top
document in the prompt) and how the task library is used (none, the right task
adapter, or a router). Prompts, decoding (greedy) and answer extraction are the
same for every method; only adapters and, for RAG, the prompt's context differ.

Routing accuracy is read from the generation's routing telemetry: for every prompt
token, layer and knowledge module, the adapter LAG chose, compared with the
question's gold knowledge adapter, split by token type (the gold entity's name in
the question, the rest of the question, the chat template, generated tokens). Per
request: the adapter chosen most often over the question's tokens (all layers and
knowledge modules) against the gold one; for a vote-routed request, its winner.

Routers beyond the paper (``lag_jax.routing.request``) are methods too
(``beyond_methods``, ``method_from_name``): Vote, ReqLAG, LAG+gate and variants, with
options in the name, e.g. ``Vote(k=4;score=score;span=user)``. Their votes and pooled
filters count the question's tokens by default (``Method.span``), the task library's
the user turn (the instruction names the task).
"""

from __future__ import annotations

from lag_jax.eval.methods import (  # noqa: F401
  BEYOND,
  SPANS,
  Method,
  beyond_methods,
  method_from_name,
  router_spec,
  select_methods,
  standard_methods,
)
from lag_jax.eval.prompts import (  # noqa: F401
  FAMILY_OF_TASK,
  RAG_PREFIX,
  TASK_PROMPTS,
  TOKEN_TYPES,
  prompt_spans,
  render_prompt,
  stop_tokens,
  token_types,
  user_message,
)
from lag_jax.eval.report import (  # noqa: F401
  markdown_table,
  plot,
  plot_methods,
  summarize,
)
from lag_jax.eval.runner import (  # noqa: F401
  PRIMARY_METRIC,
  ROUTING_METHODS,
  MethodResult,
  Setting,
  dataset_of,
  routing_accuracy,
  run_method,
  score_example,
)
