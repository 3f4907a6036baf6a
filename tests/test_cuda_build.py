"""The cuda backend's JIT loader (sparsevila_ops._cuda), on the CPU: one real build (nvcc + ninja + pybind11, no
GPU needed) through ``python -m sparsevila_ops warmup`` in a fresh process, which a second process then loads
without compiling; the build key; the fcntl lock (a killed build never blocks, a process that waited loads what
the other one built) with a fake nvcc; and a missing toolchain (import works, ``cuda`` reports why)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsevila_ops as so
from sparsevila_ops import _backend, _cuda
from sparsevila_ops.__main__ import main as cli

ROOT = Path(__file__).resolve().parent.parent
BUILDING = "building the cuda kernels into"

# Stands in for nvcc: answers --version; for a compile or link, logs "<pid> <args>", creates its -o output (or
# fails when $FAKE_NVCC_FAIL is set; prints a ptxas performance note when $FAKE_NVCC_PERF is set), marks that one
# started, then becomes `sleep $FAKE_NVCC_SLEEP` (same pid).
FAKE_NVCC = r"""#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 13.0, V13.0.88 (fake)"; exit 0; fi
echo "$$ $*" >> "$FAKE_NVCC_LOG"
if [ -n "$FAKE_NVCC_FAIL" ]; then echo "fake nvcc: error in $*" >&2; exit 2; fi
if [ -n "$FAKE_NVCC_PERF" ]; then
  echo "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized (fake)" >&2
fi
out=; prev=
for a in "$@"; do [ "$prev" = "-o" ] && out=$a; prev=$a; done
touch "$out" "$FAKE_NVCC_STARTED"
exec sleep "${FAKE_NVCC_SLEEP:-0}"
"""
BUILD = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
         "from sparsevila_ops import _cuda; print(_cuda.build())")


def _env(cache: Path, **extra) -> dict:
    return dict(os.environ, SPARSEVILA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), **extra)


def _real_toolchain() -> bool:
    return _cuda._toolchain(_cuda._env())[0] is not None


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(cache, build folder) of one real build made by ``python -m sparsevila_ops warmup`` in a new process."""
    if not _real_toolchain():
        pytest.skip(f"no toolchain: {_cuda._toolchain(_cuda._env())[1]}")
    cache = tmp_path_factory.mktemp("cuda_cache")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sparsevila_ops", "warmup"], env=_env(cache), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert BUILDING in proc.stderr and "cuda kernels ready" in proc.stdout
    # ptxas compiled every kernel as written: no serialized wgmmas (C7514 / C7518) or other reported losses
    assert _cuda.PERF_LOSS not in proc.stderr, proc.stderr
    print(f"first build: {time.perf_counter() - t0:.1f} s")
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return cache, folder


@pytest.fixture
def fresh(monkeypatch):
    """No module loaded and no failure recorded in this process; toolchain lookups redone."""
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(_cuda, "_failure", None)
    _cuda._toolchain.cache_clear()
    yield
    _cuda._toolchain.cache_clear()


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch, fresh):
    """A fake nvcc as $SPARSEVILA_NVCC (this process and its children) with its log and start marker."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    for name, value in (("SPARSEVILA_NVCC", nvcc), ("FAKE_NVCC_LOG", tmp_path / "nvcc.log"),
                        ("FAKE_NVCC_STARTED", tmp_path / "started"), ("SPARSEVILA_CACHE_DIR", tmp_path / "cache")):
        monkeypatch.setenv(name, str(value))
    return tmp_path


def _builder(cache: Path, sleep: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD], env=_env(cache, FAKE_NVCC_SLEEP=str(sleep)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_until(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _kill(procs, log: Path) -> None:
    """SIGKILL the builders' process groups and the fake nvccs still sleeping (ninja runs each in its own group)."""
    pids = [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(b"sleep"):
                    continue
            os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    for proc in procs:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_warmup_builds_a_torch_free_module_that_loads_without_a_gpu(built, monkeypatch):
    cache, folder = built
    monkeypatch.setenv("SPARSEVILA_CACHE_DIR", str(cache))
    tools = _cuda.toolchain()
    assert _cuda.build_dir() == folder  # this process computes the key the warmup process built
    assert folder.name.startswith(f"cuda-{so.__version__}-torch") and f"-cu{tools.release}-sm_90a-" in folder.name
    module = _cuda.load(_cuda.build())
    assert module.error_string(0) == "no error"
    assert {"decode_cluster", "decode_max_active_clusters"} <= set(dir(module))
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(_cuda.build())], capture_output=True, text=True).stdout
        needed = [line for line in needed.splitlines() if "NEEDED" in line]
        assert needed and not any(lib in line for line in needed for lib in ("torch", "c10", "cudart")), needed


def test_a_second_process_loads_the_cached_build_without_compiling(built):
    cache, folder = built
    (lib,) = folder.glob(f"{_cuda.MODULE}*")
    before = (folder.stat().st_mtime_ns, lib.stat().st_mtime_ns, sorted(os.listdir(cache)))
    code = ("import logging, time; logging.basicConfig(level=logging.INFO); from sparsevila_ops import _cuda; "
            "t = time.perf_counter(); m = _cuda.library(); print(_cuda.build(), time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(cache), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert BUILDING not in proc.stderr
    path, seconds = proc.stdout.split()
    assert Path(path) == lib
    assert (folder.stat().st_mtime_ns, lib.stat().st_mtime_ns, sorted(os.listdir(cache))) == before
    print(f"cached load: {float(seconds):.3f} s")
    assert float(seconds) < 10
    warm = subprocess.run([sys.executable, "-m", "sparsevila_ops", "warmup"], env=_env(cache), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert warm.returncode == 0 and BUILDING not in warm.stderr and str(lib) in warm.stdout


def test_the_cache_key_follows_sources_flags_and_versions(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(_cuda.source_dir(), src, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_cuda, "source_dir", lambda: src)
    monkeypatch.setenv("SPARSEVILA_CACHE_DIR", str(tmp_path / "cache"))
    tools = _cuda.Toolchain("nvcc", "Cuda compilation tools, release 13.0, V13.0.88", "13.0.88", "ninja", "inc",
                            "3.1.0")
    base = _cuda.build_dir(tools)
    assert base.parent == tmp_path / "cache" and _cuda.build_dir(tools) == base
    assert base.name.startswith(f"cuda-{so.__version__}-torch") and "-cu13.0.88-sm_90a-" in base.name

    def changed(**tool_fields) -> bool:
        return _cuda.build_dir(tools._replace(**tool_fields)) != base

    cu = src / "decode_cluster.cu"
    text = cu.read_text()
    for path, content in ((cu, text + "\n"), (src / "bindings.cpp", (src / "bindings.cpp").read_text() + " "),
                          (src / "sparsevila_cuda.h", (src / "sparsevila_cuda.h").read_text() + " ")):
        old = path.read_text()
        path.write_text(content)
        assert changed(), path.name
        path.write_text(old)
    assert not changed()
    (src / "extra.cuh").write_text("")  # a new header counts...
    assert changed()
    (src / "extra.cuh").unlink()
    (src / "NOTES.txt").write_text("")  # ...a file that is no source does not
    assert not changed()
    for name in ("NVCC_FLAGS", "CXX_FLAGS", "LINK_FLAGS"):
        with monkeypatch.context() as m:
            m.setattr(_cuda, name, getattr(_cuda, name) + ("-DX",))
            assert changed(), name
    with monkeypatch.context() as m:
        m.setattr(_cuda, "ARCH", "sm_100a")
        assert changed()
    assert changed(nvcc_version=tools.nvcc_version.replace("V13.0.88", "V13.1.0")) and changed(pybind11_version="3")
    for module, version in ((torch, "2.99.0"), (so, "9.9.9")):
        with monkeypatch.context() as m:
            m.setattr(module, "__version__", version)
            assert version in _cuda.build_dir(tools).name


def test_a_killed_build_leaves_no_lock_that_blocks(fake_nvcc):
    cache = fake_nvcc / "cache"
    victim = _builder(cache, sleep=600)
    nxt = None
    try:
        _wait_until(fake_nvcc / "started", victim)  # it holds the lock and nvcc runs
        os.kill(victim.pid, signal.SIGKILL)  # the builder only: its ninja and nvcc live on, orphaned
        victim.wait(timeout=30)
        left = os.listdir(cache)
        assert any(n.endswith(".lock") for n in left) and any(".tmp" in n for n in left), left
        nxt = _builder(cache, sleep=0)
        out, err = nxt.communicate(timeout=120)
        assert nxt.returncode == 0, err
        assert BUILDING in err
        lib = Path(out.strip())
        assert lib.is_file() and lib.parent.parent == cache
        assert not any(".tmp" in n for n in os.listdir(cache)), "the killed build's folder was not removed"
    finally:
        _kill((victim, nxt), fake_nvcc / "nvcc.log")


def test_a_process_that_waited_for_the_lock_loads_without_compiling(fake_nvcc):
    cache = fake_nvcc / "cache"
    first = _builder(cache, sleep=4)
    second = None
    try:
        _wait_until(fake_nvcc / "started", first)
        second = _builder(cache, sleep=0)
        out1, err1 = first.communicate(timeout=120)
        out2, err2 = second.communicate(timeout=120)
        assert first.returncode == 0 and second.returncode == 0, err1 + err2
        assert out1 == out2 and BUILDING in err1
        assert "waiting for another process" in err2 and BUILDING not in err2
        objects = len([p for p in _cuda.sources() if p.suffix in (".cu", ".cpp")])
        assert len((fake_nvcc / "nvcc.log").read_text().splitlines()) == objects + 1  # the objects + the link, once
    finally:
        _kill((first, second), fake_nvcc / "nvcc.log")


def test_a_folder_without_the_module_is_not_a_build(fake_nvcc, caplog):
    final = _cuda.build_dir()
    final.mkdir(parents=True)
    (final / "junk").write_text("")
    with caplog.at_level("INFO", logger="sparsevila_ops"):
        lib = _cuda.build()
    assert lib.parent == final and lib.is_file() and not (final / "junk").exists()
    assert [r.getMessage() for r in caplog.records if BUILDING in r.getMessage()] == [
        f"{BUILDING} {final} (first use, about a minute)"]


def test_a_ptxas_performance_loss_is_logged(fake_nvcc, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_NVCC_PERF", "1")
    with caplog.at_level("WARNING", logger="sparsevila_ops"):
        assert _cuda.build().is_file()
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    objects = len([p for p in _cuda.sources() if p.suffix in (".cu", ".cpp")])
    assert msg.startswith(f"ptxas reports {objects + 1} potential performance losses") and "(C7514)" in msg


def test_a_failed_build_is_reported_and_not_retried(fake_nvcc, monkeypatch):
    monkeypatch.setenv("FAKE_NVCC_FAIL", "1")
    with pytest.raises(RuntimeError, match="(?s)building the cuda kernels failed.*fake nvcc: error"):
        _cuda.library()
    runs = (fake_nvcc / "nvcc.log").read_text()
    with pytest.raises(RuntimeError, match="building the cuda kernels failed"):
        _cuda.library()
    assert (fake_nvcc / "nvcc.log").read_text() == runs
    assert "building the cuda kernels failed" in _cuda.unusable(torch.device("cpu"))


@pytest.mark.parametrize("missing", ["nvcc", "broken nvcc", "ninja", "pybind11"])
def test_a_missing_tool_is_the_reason_cuda_is_unavailable(missing, tmp_path, monkeypatch, fresh, capsys):
    if missing in ("ninja", "pybind11") and not _real_toolchain():
        pytest.skip("needs nvcc")
    if missing == "nvcc":
        monkeypatch.setenv("SPARSEVILA_NVCC", str(tmp_path / "no-nvcc"))
        reason = f"SPARSEVILA_NVCC={tmp_path / 'no-nvcc'} is not an executable file"
    elif missing == "broken nvcc":
        (tmp_path / "nvcc").write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "nvcc").chmod(0o755)
        monkeypatch.setenv("SPARSEVILA_NVCC", str(tmp_path / "nvcc"))
        reason = f"nvcc ({tmp_path / 'nvcc'}) does not run"
    elif missing == "ninja":
        monkeypatch.setattr(_cuda, "_find_ninja", lambda: None)
        reason = "ninja not found"
    else:
        monkeypatch.setitem(sys.modules, "pybind11", None)
        reason = "pybind11 not found"
    _cuda._toolchain.cache_clear()
    assert reason in _cuda.unusable(torch.device("cpu"))
    assert reason in _backend._unusable("decode_attention", "cuda", torch.device("cpu"))
    assert "cuda" not in so.available_backends("decode_attention", "cpu")
    with pytest.raises(RuntimeError, match="the cuda backend cannot be built"):
        _cuda.build()
    assert cli(["warmup"]) == 1
    assert reason in capsys.readouterr().err


def test_import_works_without_a_toolchain(tmp_path):
    """A fresh process with no nvcc on PATH and a broken $SPARSEVILA_NVCC imports the package; ``cuda`` is
    left out of the available backends with the reason, and warmup exits non-zero with it."""
    (tmp_path / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "nvcc").chmod(0o755)
    env = _env(tmp_path / "cache", SPARSEVILA_NVCC=str(tmp_path / "nvcc"), PATH="/usr/bin:/bin")
    code = ("import torch, sparsevila_ops as so; from sparsevila_ops import _backend; "
            "print(so.available_backends('decode_attention', 'cpu')); "
            "print(_backend._unusable('decode_attention', 'cuda', torch.device('cpu')))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    backends, reason = proc.stdout.splitlines()
    assert "cuda" not in backends and "does not run" in reason
    warm = subprocess.run([sys.executable, "-m", "sparsevila_ops", "warmup"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert warm.returncode == 1 and "does not run" in warm.stderr


def test_warmup_is_listed_and_has_help(capsys):
    assert cli(["--help"]) == 0
    assert "warmup" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli(["warmup", "--help"])
    assert e.value.code == 0 and "no GPU needed" in capsys.readouterr().out


def test_interface_is_one_ops_binding_and_declaration():
    """A cuda Tunable hashes its op's ``m.def`` statement and ``svo_`` declaration, not the whole shared files:
    another op's binding can change without invalidating its tuned entries."""
    gemv = _cuda.interface("gemv")
    assert gemv[0].startswith('m.def(\n      "gemv",') and gemv[0].endswith('py::arg("stream"));')
    assert gemv[1].startswith("int svo_gemv(") and gemv[1].endswith("void* stream);")
    assert "w4a16" not in "".join(gemv)
    one_line = _cuda.interface("salience_block_rows")
    assert one_line == ('m.def("salience_block_rows", &svo_salience_block_rows, "Rows per salience CTA (grid sizing).");',
                        "int svo_salience_block_rows();")
    with pytest.raises(ValueError, match="no binding or declaration of 'nope'"):
        _cuda.interface("nope")
