"""Retrieval over a knowledge source: BM25 (for the RAG, PRAG, P-LAG and R-LAG baselines)."""

from __future__ import annotations

from lag_jax.retrieval.bm25 import BM25Index, recall_at_k

__all__ = ["BM25Index", "recall_at_k"]
