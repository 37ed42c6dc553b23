"""Nothing corrupt, nothing silent, for offloaded libraries: offload.json
records every file's size, header digest and block digests; opening a folder with a
flipped byte, a truncated or missing file, or a NaN raises an IntegrityError naming the
file (and the layer and adapter), at open or, with ``verify="lazy"``, at first read."""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_offload import random_library

from lag_jax.errors import IntegrityError
from lag_jax.routing import offload
from lag_jax.routing.hook import routed
from lag_jax.routing.offload import (
  MANIFEST,
  OffloadedLibrary,
  OffloadWriter,
  save_offloaded,
)
from lag_jax.routing.routers import RouterSpec

MODULE = "up_proj"  # O 128, I 64: A* rows of 1 KB, B* rows of 2 KB (float32, R = 4)


def saved(tmp_path, name="lib", modules=(MODULE,), n=6, **kw):
  folder = tmp_path / name
  save_offloaded(random_library(n, modules, seed=11), folder, **kw)
  return folder


def opened(folder, verify=None) -> OffloadedLibrary:
  """OffloadedLibrary.open, with ``verify`` only where given (the default: "full")."""
  return OffloadedLibrary.open(folder, slots=4, **({} if verify is None else {"verify": verify}))


def data_offset(path) -> int:
  return np.load(path, mmap_mode="r").offset


def flip(path, at: int) -> None:
  """Inverts one byte of ``path``'s data (``at`` bytes past the header)."""
  with open(path, "r+b") as f:
    f.seek(data_offset(path) + at)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def redigest(folder, name: str, n_axis: int = 1) -> None:
  """Records the file's digests as it is now (a change only the value check can catch)."""
  manifest = json.loads((folder / MANIFEST).read_text())
  if "files" not in manifest:  # (a library written before digests: nothing to redo)
    return
  entry = manifest["files"][name]
  path = str(folder / name)
  manifest["files"].update(
    offload._describe([(path, np.dtype(entry["dtype"]), tuple(entry["shape"]), n_axis)])
  )
  (folder / MANIFEST).write_text(json.dumps(manifest))


@functools.partial(jax.jit, static_argnames=("module",))
def _route(o, layer, x, *, module):
  d, c, _ = o.route(module, x, o.at_layer(layer))
  return d, c


def use(olib, layer: int, adapter: int):
  """The ``fixed`` router with ``adapter`` at ``layer``: fetches its A* and B* rows."""
  o = routed(olib, 1, RouterSpec("fixed"), fixed_ids=[adapter])
  x = jnp.ones((1, 2, 64), jnp.float32)
  return _route(o, jnp.int32(layer), x, module=MODULE)


# --- What the manifest records ------------------------------------------------------------


def test_manifest_records_every_file(tmp_path):
  """Digests of chunks written out of order (the writer pwrites them) are the files'."""
  lib = random_library(5, (MODULE, "down_proj"), seed=2)
  folder = tmp_path / "w"
  w = lib.weights
  with OffloadWriter(
    folder, lib.names, {m: (w.b[m].shape[2], w.a[m].shape[3]) for m in lib.modules},
    num_layers=2, rank=4,
  ) as writer:  # fmt: skip
    for m in lib.modules:
      for start in (3, 0):  # the last chunk first
        stop = 5 if start else 3
        writer.write(m, start, w.a[m][:, start:stop], w.b[m][:, start:stop])
  files = json.loads((folder / MANIFEST).read_text())["files"]
  assert sorted(files) == sorted(
    f"{m}.{f}.npy" for m in lib.modules for f in ("a", "b", "arrows", "valid")
  )
  for name, entry in files.items():
    path = folder / name
    assert entry["bytes"] == os.path.getsize(path)
    assert entry["shape"] == list(np.load(path, mmap_mode="r").shape)
    data = path.read_bytes()[data_offset(path) :]
    K = entry["block_bytes"]
    want = [offload._digest(data[j : j + K]) for j in range(0, len(data), K)]
    assert entry["blocks"] == want, name
  assert files["up_proj.a.npy"]["dtype"] == "float32"
  assert files["up_proj.valid.npy"]["dtype"] == "bool"
  olib = opened(folder)  # verify="full"
  np.testing.assert_array_equal(olib.host.factors["b"][MODULE], np.asarray(w.b[MODULE]))


# --- Flipped bytes ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "field, at, where",
  [
    ("arrows", 4 * 600, r"layer 1"),  # blocks of 256 of [2, 64, 6]: 512-767 is layer 1
    ("a", 1024 * (6 + 4) + 17, r"layer 1, adapter 'ad004'"),
    ("b", 2048 * 3 + 2, r"layer 0, adapter 'ad003'"),
    ("valid", 7, r"layer 0 adapter 'ad000' to layer 1 adapter 'ad005'"),
  ],
)
def test_a_flipped_byte_is_named_at_open(tmp_path, monkeypatch, field, at, where):
  monkeypatch.setattr(offload, "_BLOCK_BYTES", 1024, raising=False)  # a block per row of A* / B*
  folder = saved(tmp_path)
  flip(folder / f"{MODULE}.{field}.npy", at)
  with pytest.raises(IntegrityError, match=rf"{MODULE}\.{field}\.npy: bytes .*\({where}\) do not"):
    opened(folder)


@pytest.mark.parametrize("field", ["arrows", "valid"])
def test_arrows_and_valid_are_verified_whatever_verify_says(tmp_path, field):
  folder = saved(tmp_path)
  flip(folder / f"{MODULE}.{field}.npy", 3)
  for verify in (None, "size", "lazy"):
    with pytest.raises(IntegrityError, match=rf"{MODULE}\.{field}\.npy: .*digest"):
      opened(folder, verify)


def test_lazy_verifies_a_block_when_first_read(tmp_path, monkeypatch):
  monkeypatch.setattr(offload, "_BLOCK_BYTES", 1024, raising=False)
  folder = saved(tmp_path)
  flip(folder / f"{MODULE}.b.npy", 2048 * (6 + 4) + 9)  # B* of adapter 4 at layer 1
  with pytest.raises(IntegrityError, match=r"up_proj\.b\.npy.*layer 1, adapter 'ad004'"):
    opened(folder)
  size = opened(folder, "size")  # trusted: not read at all
  use(size, 1, 4)
  olib = opened(folder, "lazy")
  use(olib, 1, 2)  # other blocks: fine
  use(olib, 0, 4)
  checks = olib.host.checks["b", MODULE]
  assert checks.verified.sum() == 2 and olib.host.checks["a", MODULE].verified.sum() == 2
  # Inside the jitted call JAX reports the IntegrityError as a runtime error carrying it.
  with pytest.raises(Exception, match=r"IntegrityError: .*up_proj\.b\.npy: bytes .*'ad004'"):
    use(olib, 1, 4)
  with pytest.raises(IntegrityError, match=r"up_proj\.b\.npy: .*found by an earlier call"):
    use(olib, 1, 2)  # the library is no longer used, even for good blocks


# --- Missing, truncated, malformed ---------------------------------------------------------


def test_truncated_file(tmp_path):
  folder = saved(tmp_path)
  path = folder / f"{MODULE}.a.npy"
  size = os.path.getsize(path)
  os.truncate(path, size - 100)
  for verify in (None, "size"):
    with pytest.raises(
      IntegrityError, match=rf"up_proj\.a\.npy is {size - 100:,} bytes, expected {size:,} \(tr"
    ):
      opened(folder, verify)


def test_missing_files_are_one_error(tmp_path):
  folder = saved(tmp_path, modules=(MODULE, "down_proj"))
  os.remove(folder / "up_proj.a.npy")
  os.remove(folder / "down_proj.arrows.npy")
  with pytest.raises(IntegrityError) as e:
    opened(folder)
  msg = str(e.value)
  assert "corrupt or incomplete" in msg and "\n" not in msg
  assert "module 'up_proj': " in msg and "up_proj.a.npy is missing" in msg
  assert "module 'down_proj': " in msg and "down_proj.arrows.npy is missing" in msg


def test_corrupt_manifest(tmp_path):
  folder = saved(tmp_path)
  text = (folder / MANIFEST).read_text()
  (folder / MANIFEST).write_text(text[: len(text) // 2])
  with pytest.raises(IntegrityError, match=r"offload\.json: .*manifest is unreadable"):
    opened(folder)


# --- Non-finite values ----------------------------------------------------------------------


def test_a_nan_in_a_factor_with_matching_digests(tmp_path, monkeypatch):
  monkeypatch.setattr(offload, "_BLOCK_BYTES", 1024, raising=False)
  folder = saved(tmp_path)
  a = np.load(folder / f"{MODULE}.a.npy", mmap_mode="r+")
  a[1, 3, 2, 5] = np.nan
  a.flush()
  del a
  redigest(folder, f"{MODULE}.a.npy")
  with pytest.raises(
    IntegrityError,
    match=r"up_proj\.a\.npy: a non-finite value \(nan\) at layer 1, adapter 'ad003' "
    r"\(index \[1, 3, 2, 5\]\)",
  ):
    opened(folder)
  olib = opened(folder, "lazy")
  use(olib, 1, 2)
  with pytest.raises(Exception, match=r"IntegrityError: .*non-finite value \(nan\) at layer 1"):
    use(olib, 1, 3)


def test_a_nan_in_the_arrows_with_matching_digests(tmp_path):
  folder = saved(tmp_path)
  arrows = np.load(folder / f"{MODULE}.arrows.npy", mmap_mode="r+")
  arrows[0, 10, 4] = np.inf
  arrows.flush()
  del arrows
  redigest(folder, f"{MODULE}.arrows.npy", n_axis=2)
  for verify in (None, "size"):
    with pytest.raises(
      IntegrityError,
      match=r"up_proj\.arrows\.npy: a non-finite value \(inf\) at layer 0, adapter 'ad004'",
    ):
      opened(folder, verify)


# --- Manifests written before digests ------------------------------------------------------


def test_manifest_without_digests_opens_with_a_warning(tmp_path, caplog):
  folder = saved(tmp_path)
  manifest = json.loads((folder / MANIFEST).read_text())
  manifest.pop("files", None)
  (folder / MANIFEST).write_text(json.dumps(manifest))
  with caplog.at_level(logging.WARNING):
    olib = opened(folder)
  assert "before offloaded libraries recorded digests" in caplog.text
  assert "re-write the library" in caplog.text
  use(olib, 1, 3)
  # Sizes and values are still checked.
  arrows = np.load(folder / f"{MODULE}.arrows.npy", mmap_mode="r+")
  arrows[1, 0, 0] = np.nan
  arrows.flush()
  del arrows
  with pytest.raises(IntegrityError, match=r"arrows\.npy: a non-finite value \(nan\)"):
    opened(folder, "size")
  os.truncate(folder / f"{MODULE}.b.npy", 1000)
  with pytest.raises(IntegrityError, match=r"up_proj\.b\.npy is 1,000 bytes"):
    opened(folder)


def test_verify_must_be_known(tmp_path):
  folder = saved(tmp_path)
  with pytest.raises(ValueError, match=r"verify='fast', expected one of"):
    opened(folder, "fast")
