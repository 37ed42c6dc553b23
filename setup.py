"""lag_jax: LoRA-Augmented Generation in JAX / Flax NNX."""

import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (here / name).read_text().splitlines()
  return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


setup(
  name="lag_jax",
  version="0.1.0",
  description="LoRA-Augmented Generation (LAG): per-token routing over large LoRA libraries",
  long_description=(here / "README.md").read_text(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  packages=find_packages(include=["lag_jax", "lag_jax.*"]),
  install_requires=_requirements("requirements.txt"),
  extras_require={"test": _requirements("requirements-test.txt")},
  license="Apache-2.0",
)
