"""Routing benchmarks: decode-step cost of Arrow / LAG / SpectR against the cost model,
against PEFT's Arrow, signature build time and library memory (issue 3, items 1-4).

Run from the repository root (the malloc settings keep glibc from returning and
re-faulting large buffers between steps, which makes CPU timings erratic here):

  MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
  MALLOC_TOP_PAD_=1073741824 python -m benchmarks.routing

The default took about 20 minutes on 2 cores before the prefill part and the extra
profile rows were added. The full sweep (adds the 3B-shaped slice
at N = 10,000 with a one-layer 8.7 GB library, 9 rounds, PEFT's loading timed for 15 min):

  MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
  MALLOC_TOP_PAD_=1073741824 python -m benchmarks.routing --full

Parts (``--parts``, comma-separated):
  memory      resident library bytes per adapter against the exact 2 h r count (+ arrows),
              uniform rank 6 and mixed ranks 4..8 (padded to 8).
  signatures  spectral signatures of N = 1000 SmolLM2-shaped rank-6 adapters on
              gate/up/down (30 layers) through ``AdapterLibrary.from_adapters``, against a
              dense SVD of s B A timed on a sample of adapter-modules and extrapolated.
  decode      one [B, 1] decode step with a 128-slot KV cache, jitted with the weights,
              the library and the cache as arguments (nnx.split; never closed over), for
              base / single LoRA / Arrow (hard) / LAG (k = 20) / SpectR, interleaved rounds,
              medians; measured ratio to base next to the cost-model ratio (LAG.md).
              The layer stack is timed (``return_hidden=True``: embedding, L layers, final
              norm; no LM head), so the 3B slice uses a reduced vocabulary (4096).
  profile     per-op micro-benchmarks of one layer's routed modules at decode shapes
              ([B, 1]): arrow scores, top-k, the library's candidate projections
              (``gather_adapters``, ``project_all``), apply, whole routers (``route_lag``
              with each projection), and the previous block gather / 4-D einsum for
              comparison, to explain the decode ratios.
  prefill     one layer's LAG routing (gate/up/down, SmolLM2 shapes) for a [1, T] prefill
              at N = 100 and 1000: ``route_lag`` with projection gather / dense / auto (and
              grouped where it is affordable on CPU), against the arrow scores alone.
  peft        our ``arrow_softmax`` (top_k 3) against PEFT's ``create_arrow_model`` on the
              real packaged SmolLM2, same prompts, greedy, tokens/s.

Random libraries. Knowledge libraries larger than ``--real_max_n`` adapters are built
directly as ``LibraryWeights`` (A* rows random and unit-norm, B* random, arrows = A*[:, 0]):
routing cost does not depend on the values. The smaller ones go through PEFT-style
adapters (``random_lora``) and ``AdapterLibrary.from_adapters`` (the real path); the
table marks which. Depths are reduced where a library would exceed
``--max_library_gb``; each row states its depth, and ratios compare equal depths.

Every unit of work (signatures, memory, each decode and profile row, prefill, PEFT) runs
in its own spawned process, so multi-GB libraries are returned to the OS in between (with
the malloc settings above glibc keeps freed heap memory); ``--child_timeout_s`` bounds
each unit's wall time (a unit past it is killed and recorded as failed).

Writes benchmarks/results/routing.json, benchmarks/results/routing.png and the section
between ``<!-- routing:begin -->`` and ``<!-- routing:end -->`` of BENCHMARKS.md
(``--render`` rewrites the section and the plot from the JSON without measuring).
"""
