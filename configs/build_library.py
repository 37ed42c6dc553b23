"""Stack a folder of PEFT LoRA adapters into a routed library (signatures computed once).

  python -m lag_jax.run --config=configs/build_library.py \
      --config.adapters_dir=/path/to/peft_adapters --config.library_dir=/path/to/library
Tiny variant (random adapters for the tiny random model):
  python -m lag_jax.run --config=configs/build_library.py:tiny --workdir=/tmp/lag_lib
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "build_library"
  c.checkpoint = "smollm2"  # only its config.json is read
  c.adapters_dir = ""  # sub-folders are PEFT adapters, named after the folder
  c.library_dir = ""  # default: <workdir>/library
  c.modules = ""  # comma-separated; default every module the adapters cover
  c.dtype = "float32"
  c.allow_pickle = False
  if arg == "tiny":
    c.checkpoint = "tiny-random"
    c.adapters_dir = "tiny-random-adapters"
  elif arg:
    raise ValueError(f"configs/build_library.py: unknown variant {arg!r} (use 'tiny')")
  return c
