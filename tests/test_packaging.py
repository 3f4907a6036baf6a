"""Packaging: pyproject.toml declares a PEP 517/660 setuptools build (so `pip install --no-build-isolation -e .`
works offline), the extras resolve with whatever torch is installed (triton only has a floor), and the wheel
maps the top-level autotune/, triton_kernels/ and csrc/ into sparsevila_ops with every package and the CUDA/C++
sources (csrc/ holds sources only: the cuda backend's host code lives in sparsevila_ops)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement  # noqa: E402  (pytest depends on packaging)
from packaging.version import Version  # noqa: E402


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _extras(pyproject):
    return {name: [Requirement(r) for r in reqs]
            for name, reqs in pyproject["project"]["optional-dependencies"].items()}


def test_build_backend_is_declared(pyproject):
    build = pyproject["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    (setuptools,) = [Requirement(r) for r in build["requires"] if Requirement(r).name == "setuptools"]
    # PEP 660 editable installs need >= 64; building without the `wheel` package (offline, --no-build-isolation)
    # needs bdist_wheel inside setuptools, >= 70.1.
    assert not setuptools.specifier.contains("70.0") and setuptools.specifier.contains("70.1")
    assert not os.path.exists(os.path.join(ROOT, "setup.py")), "the build is declared in pyproject.toml only"


def test_extras_have_no_exact_triton_pin(pyproject):
    extras = _extras(pyproject)
    assert {"triton", "test", "cuda", "hf", "bench"} <= set(extras)
    tritons = [r for reqs in extras.values() for r in reqs if r.name == "triton"]
    assert tritons, "the triton, test and bench extras need triton"
    for r in tritons:
        # A floor only: the exact triton is the one the installed torch requires (PyPI torch 2.13.0: 3.7.1).
        assert all(s.operator in (">=", ">") for s in r.specifier), f"triton must only have a floor: {r}"
        for v in ("3.6.0", "3.7.1", "3.9.0"):
            assert r.specifier.contains(v), f"{r} excludes triton {v}, which the kernels are tested with"
    # torch has a floor only too (install it first, e.g. the CPU wheel): never an exact pin in the metadata.
    torch_reqs = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "torch"]
    assert torch_reqs and all(s.operator in (">=", ">") for r in torch_reqs for s in r.specifier)


def test_hf_extra_and_test_extra_carry_transformers(pyproject):
    extras = _extras(pyproject)
    for name in ("hf", "test"):
        (tf,) = [r for r in extras[name] if r.name == "transformers"]
        assert tf.specifier.contains("5.17.0") and not tf.specifier.contains("5.18.0"), (name, str(tf))
        assert not tf.specifier.contains("5.16.9"), (name, str(tf))
    test = {r.name for r in extras["test"]}
    assert {"pytest", "pytest-benchmark", "hypothesis", "ninja", "pybind11", "matplotlib", "triton"} <= test


def test_every_package_directory_is_listed(pyproject):
    tool = pyproject["tool"]["setuptools"]
    package_dir = tool["package-dir"]
    assert package_dir["sparsevila_ops.triton_kernels"] == "triton_kernels"
    assert package_dir["sparsevila_ops.csrc"] == "csrc"
    assert package_dir["sparsevila_ops.autotune"] == "autotune"
    found = set()
    for top, pkg in (("sparsevila_ops", "sparsevila_ops"), ("triton_kernels", "sparsevila_ops.triton_kernels"),
                     ("csrc", "sparsevila_ops.csrc"), ("autotune", "sparsevila_ops.autotune")):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
                found.add(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    assert found == set(tool["packages"]), "pyproject [tool.setuptools] packages must list every package"
    from sparsevila_ops._cuda import SOURCE_SUFFIXES
    assert pyproject["tool"]["setuptools"]["package-data"]["sparsevila_ops.csrc"] == [f"*{s}" for s in SOURCE_SUFFIXES]
    assert [f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".py")] == ["__init__.py"]
    assert pyproject["tool"]["setuptools"]["package-data"]["sparsevila_ops.autotune"] == ["configs/*.json"]
    assert any(f.endswith(".cu") for f in os.listdir(os.path.join(ROOT, "csrc")))
    cuda_extra = {Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["cuda"]}
    assert {"ninja", "pybind11"} <= cuda_extra, "the cuda backend's build tools (besides nvcc)"


def test_version_matches_package(pyproject):
    import sparsevila_ops

    assert pyproject["project"]["version"] == sparsevila_ops.__version__


def test_setuptools_accepts_the_configuration():
    """setuptools' own validation of pyproject.toml (schema + [tool.setuptools]), without building."""
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    cfg = config.read_configuration(os.path.join(ROOT, "pyproject.toml"))
    assert cfg["project"]["name"] == "sparsevila_ops"


def test_offline_wheel_maps_the_subpackages(tmp_path):
    """`pip wheel --no-build-isolation` with no index (the offline GPU image's situation) builds a wheel that
    holds sparsevila_ops/triton_kernels/*.py and every source of sparsevila_ops/csrc/. Built from a copy of the
    sources so the checkout gets no build/ directory."""
    setuptools = pytest.importorskip("setuptools")
    if Version(setuptools.__version__) < Version("70.1"):
        pytest.skip(f"setuptools {setuptools.__version__} < 70.1 cannot build a wheel without the wheel package")
    src = tmp_path / "src"
    for d in ("sparsevila_ops", "triton_kernels", "csrc", "autotune"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "autotune" / "configs").mkdir(exist_ok=True)
    (src / "autotune" / "configs" / "test_gpu.json").write_text("{}")  # a shipped table is package data
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = (tmp_path / "dist").glob("sparsevila_ops-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for f in ("sparsevila_ops/__init__.py", "sparsevila_ops/_interpreter.py",
              "sparsevila_ops/triton_kernels/__init__.py", "sparsevila_ops/triton_kernels/decode.py",
              "sparsevila_ops/csrc/__init__.py", "sparsevila_ops/csrc/decode_cluster.cu",
              "sparsevila_ops/csrc/bindings.cpp", "sparsevila_ops/csrc/sparsevila_cuda.h",
              "sparsevila_ops/cuda_decode.py", "sparsevila_ops/_cuda.py", "sparsevila_ops/_device.py",
              "sparsevila_ops/autotune/__init__.py", "sparsevila_ops/autotune/__main__.py",
              "sparsevila_ops/autotune/configs/test_gpu.json"):
        assert f in names, f"{f} missing from the wheel"
    assert not any(n.startswith(("triton_kernels/", "csrc/", "autotune/", "tests/", "bench/")) for n in names)
    meta = [n for n in names if n.endswith(".dist-info/METADATA")][0]
    reqs = [line.split(":", 1)[1].strip() for line in zipfile.ZipFile(whl).read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")]
    assert not any(Requirement(r).name == "triton" and "==" in str(Requirement(r).specifier) for r in reqs)
