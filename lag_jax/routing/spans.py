"""Prompt spans for request-level routing: which prompt tokens a vote or a pooled filter
counts (``routed(..., span=...)``).

A chat template adds tokens that are the same for every request (role markers, a
system prompt, the generation prompt), and an instruction adds more; their routing
decisions carry no knowledge of the request and dilute a vote. A span limits the
vote to the user's content, or to the question inside it, by character offsets of the
rendered prompt mapped to tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_mask(offsets: Sequence[tuple[int, int]], char_spans) -> np.ndarray:
  """[T] bool: the tokens (by their (start, end) character offsets) that overlap any
  (start, end) of ``char_spans`` (None entries are skipped)."""
  mask = np.zeros((len(offsets),), bool)
  for span in char_spans:
    if span is None:
      continue
    lo, hi = span
    for t, (s, e) in enumerate(offsets):
      if s < hi and e > lo:
        mask[t] = True
  return mask


def text_span(tokenizer, text: str, content: str) -> tuple[list[int], np.ndarray]:
  """Token ids of ``text`` (as ``Tokenizer.encode``: no special tokens added) and the
  [T] bool mask of the tokens of ``content``'s last occurrence in it.

  Raises:
    ValueError: ``content`` is empty or does not occur in ``text``.
  """
  content = content if content in text else content.strip()  # templates may trim it
  start = text.rfind(content) if content else -1
  if start < 0:
    raise ValueError(f"span text {content[:40]!r} does not occur in the prompt")
  enc = tokenizer.backend.encode(text, add_special_tokens=False)
  return list(enc.ids), token_mask(enc.offsets, [(start, start + len(content))])


def user_turn_span(
  tokenizer, user: str, system_prompt: str = "", *, span_text: str | None = None
) -> tuple[str, list[int], np.ndarray]:
  """A one-turn chat prompt and its user-turn span.

  Args:
    tokenizer: a ``lag_jax.text.Tokenizer`` with a chat template.
    user: the user's message.
    system_prompt: an optional system message.
    span_text: the part of the user's message to mark (e.g. the question inside an
      instruction); default the whole message.
  Returns:
    (the rendered prompt with the generation prompt, its token ids, the [T] bool span).
  """
  messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
    {"role": "user", "content": user}
  ]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  ids, mask = text_span(tokenizer, text, user if span_text is None else span_text)
  return text, ids, mask
