"""Prompts of the evaluation: one instruction per task family, the chat prompt with
or without a retrieved page, the prompt spans request-level routers pool over, and the
token types routing accuracy is split by."""

from __future__ import annotations

import numpy as np

from lag_jax.data.records import KiltExample
from lag_jax.routing.spans import token_mask
from lag_jax.text.tokenizer import Tokenizer

# One instruction per task family; {input} is the KILT input.
TASK_PROMPTS = {
  "qa": "Answer the question with a short phrase, no explanation.\n\nQuestion: {input}",
  "slot": (
    "Give the value of the relation for the subject, as a short phrase.\n\n"
    "Subject [SEP] relation: {input}"
  ),
  "fact": (
    "Is the claim true or false? Answer SUPPORTS if it is true and REFUTES if it "
    "is false.\n\nClaim: {input}"
  ),
  "link": (
    "Which Wikipedia page does the entity between [START_ENT] and [END_ENT] refer "
    "to? Answer with the page title only.\n\n{input}"
  ),
  "chat": "Continue the conversation with one informative sentence.\n\n{input}",
}
RAG_PREFIX = "Context: {text}\n\n"
FAMILY_OF_TASK = {"qa": "QA", "slot": "Slot", "fact": "Fact", "link": "Link", "chat": "Chat"}
TOKEN_TYPES = ("entity", "question", "template", "generated")


def render_prompt(
  tokenizer: Tokenizer, ex: KiltExample, context: str | None = None, system_prompt: str = ""
):
  """The chat-templated prompt and the character spans of its parts.

  Returns (text, question_span, entity_span), spans as (start, end) or None.
  """
  user = user_message(ex, context)
  messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
    {"role": "user", "content": user}
  ]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  q_start = text.rfind(ex.input)
  question = (q_start, q_start + len(ex.input)) if q_start >= 0 else None
  entity = None
  if ex.provenance and question is not None:
    e = text.find(ex.provenance[0], q_start)
    if 0 <= e < question[1]:
      entity = (e, e + len(ex.provenance[0]))
  return text, question, entity


def user_message(ex: KiltExample, context: str | None = None) -> str:
  """The user turn's content: the task instruction with the input (and RAG context)."""
  user = TASK_PROMPTS[ex.task].format(input=ex.input)
  return user if context is None else RAG_PREFIX.format(text=context) + user


def prompt_spans(text: str, offsets, question, user: str) -> dict[str, np.ndarray]:
  """[T] bool token masks of a rendered prompt for each of SPANS."""
  start = text.rfind(user)
  user_span = (start, start + len(user)) if start >= 0 else None
  out = {"prompt": np.ones((len(offsets),), bool), "user": token_mask(offsets, [user_span])}
  out["question"] = token_mask(offsets, [question]) if question else out["user"]
  for key in ("user", "question"):
    if not out[key].any():
      out[key] = out["prompt"]
  return out


def token_types(offsets, question, entity, n_prompt):
  types = np.full((n_prompt,), 2, np.int8)  # template
  for t, (s, e) in enumerate(offsets[:n_prompt]):
    if question and s < question[1] and e > question[0]:
      types[t] = 1
    if entity and s < entity[1] and e > entity[0]:
      types[t] = 0
  return types


def stop_tokens(tok) -> tuple[int, ...]:
  """The chat turn's end and the document separator: knowledge adapters are trained on
  texts that end with the separator, and a model that emits it has finished its answer."""
  doc_end = tok.token_to_id("<|endoftext|>")
  return tuple(dict.fromkeys((*tok.eos_token_ids, *(() if doc_end is None else (doc_end,)))))
