"""LAG routing: spectral signatures, stacked adapter libraries (on one device or sharded
over a mesh), routers, the model hook."""

from lag_jax.routing.hook import RoutedAdapters, RoutedLibrary, routed
from lag_jax.routing.library import (
  KNOWLEDGE_MODULES,
  TASK_MODULES,
  AdapterLibrary,
  LibraryWeights,
  load_or_build_library,
)
from lag_jax.routing.routers import ROUTERS, RouterSpec
from lag_jax.routing.sharded import AdapterSharding, ShardedLibrary, shard_library
from lag_jax.routing.shared import remove_shared
from lag_jax.routing.signatures import spectral_align, spectral_align_stacked

__all__ = [
  "KNOWLEDGE_MODULES",
  "ROUTERS",
  "TASK_MODULES",
  "AdapterLibrary",
  "AdapterSharding",
  "LibraryWeights",
  "RoutedAdapters",
  "RoutedLibrary",
  "RouterSpec",
  "ShardedLibrary",
  "load_or_build_library",
  "remove_shared",
  "routed",
  "shard_library",
  "spectral_align",
  "spectral_align_stacked",
]
