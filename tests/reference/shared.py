"""A dense float64 reference for shared-direction removal (lag_jax/routing/shared.py),
from the adapters' raw PEFT factors: the directions (the mean adapter's top right
singular vectors, or the share-weighted Gram's top eigenvectors) and the adapters seen
through P = 1 - W W^T (arrows of (s B A) P, SpectR norms ||V^T P x||; deltas unchanged).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reference import routing as ref


def dense(adapter, module, layer):
  """s B A [O, I] in float64, or None where the adapter does not cover the place."""
  for m in adapter.modules.values():
    if m.module == module and m.layer == layer:
      return m.scale * np.asarray(m.b, np.float64) @ np.asarray(m.a, np.float64)
  return None


def ref_directions(adapters, module, layer, mode, count, among):
  mats = [dense(a, module, layer) for a in adapters]
  used = [d for d, ok in zip(mats, among, strict=True) if ok and d is not None and np.any(d)]
  if mode == "mean":
    _, _, vt = np.linalg.svd(sum(used) / len(used))
    return vt[:count].T
  gram = 0.0
  for d in used:
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    rel = s / s[0]
    gram = gram + (vt.T * rel**2) @ vt / len(used)
  vals, vecs = np.linalg.eigh(gram)
  return vecs[:, ::-1][:, :count]


def ref_shared_module(adapters, config, module, layer, w):
  """RefAdapters seen through P = 1 - W W^T: the arrow of (s B A) P, SpectR norms
  ||V^T P x||, deltas s B A x unchanged."""
  p = np.eye(w.shape[0]) - w @ w.T
  out = []
  for adapter, r in zip(adapters, ref.ref_module(adapters, config, module, layer), strict=True):
    if not r.valid:
      out.append(r)
      continue
    _, _, vt = np.linalg.svd(dense(adapter, module, layer) @ p)
    out.append(dataclasses.replace(r, arrow=vt[0], v=r.v @ p))
  return out
