"""Build, cache and load this package's native C++ kernels (kernels/csrc/*.cpp) on first use.

Each kernel is one C++ file with a plain C ABI, compiled with the system's C++ compiler into a shared library
and called through ctypes (ctypes.CDLL releases the GIL for the call, which the engine's threads rely on).
The library is cached under localchat.settings.cache_dir()/kernels (~/.cache/localchat/kernels), keyed by the
source, the compiler and its version, the flags and the CPU, because `-march=native` code must neither be
rebuilt every start (~1 s or more on these 2-core machines) nor be loaded on a different CPU.

Callers decide what a missing library means; `load_library` only logs why and returns None, so every
kernel keeps a pure-PyTorch path (LOCALCHAT_NATIVE_KERNELS=0 forces that path everywhere).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from localchat import settings

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# -fopenmp links libgomp.so.1, which resolves to the runtime torch already loaded: the kernels' parallel
# regions then share torch's threads instead of oversubscribing the cores with a second pool.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


def enabled() -> bool:
    """False when LOCALCHAT_NATIVE_KERNELS says 0/false/no/off: every caller then keeps its PyTorch path."""
    return settings.env_flag("LOCALCHAT_NATIVE_KERNELS", True)


def find_compiler() -> str | None:
    """$CXX if set and found, else the first of g++, c++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_signature() -> str:
    # -march=native code must not be loaded on a different CPU (a home directory shared between machines).
    return settings.cpu_flags_line() or platform.processor() or platform.machine()


def cache_dir() -> Path:
    return settings.cache_dir() / "kernels"


def build(source: Path, name: str, compiler: str, flags: Sequence[str] = FLAGS) -> Path:
    """The cached shared library for `source`, compiling it first if this source/compiler/flags/CPU is new."""
    flags = list(flags)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    # Every source of the folder goes into the key: a kernel may #include another one.
    sources = [Path(source).read_text()] + [p.read_text() for p in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))]
    key = hashlib.sha256("\0".join([*sources, compiler, version, " ".join(flags), cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: another process building at the same time can't see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(
    source: Path,
    name: str,
    *,
    setup: Callable[[ctypes.CDLL], None] | None = None,
    flags: Sequence[str] = FLAGS,
    compiler: Callable[[], str | None] | None = None,
    logger: logging.Logger | None = None,
    what: str | None = None,
) -> ctypes.CDLL | None:
    """Build (or find in the cache) and load `source` as library `name`; None if that can't be done.

    `setup` declares the functions' ctypes signatures; an exception there (a missing symbol) also means
    None. `compiler` finds the compiler (default: this module's `find_compiler`, looked up at call time so
    tests can take the compiler away). Failures are logged as one warning on `logger` (default: this
    module's), naming `what` the caller falls back from.
    """
    if not enabled():
        return None
    logger = logger or log
    try:
        cxx = (compiler or find_compiler)()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        lib = ctypes.CDLL(str(build(source, name, cxx, flags)))
        if setup is not None:
            setup(lib)
        return lib
    except Exception as exc:  # any failure leaves the caller's PyTorch path in charge
        logger.warning("%s unavailable, using the PyTorch path: %s", what or f"native kernel {name!r}", exc)
        return None
