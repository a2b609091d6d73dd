"""The memory allocator `fisherguard serve` runs on (docs/deployment.md#memory).

The engine allocates tensors of many sizes in its thread and frees them in others; glibc's malloc
keeps the freed pieces mapped, so the resident set creeps up by about a kilobyte per request although
nothing is kept (the Python heap stays flat under tracemalloc). jemalloc reuses them. `auto` re-executes
the process with jemalloc preloaded when the machine has it, before torch is imported; `system` keeps
the C library's malloc; `jemalloc` insists and fails when it is missing.

jemalloc is started with `MALLOC_CONF` = `CONF` unless the environment sets its own: freed pages are
kept for reuse rather than purged over the default 10 s decay. With the default, every large tensor
(a 224×224 activation is tens of MB) came back as fresh pages, page-faulted on first touch: ResNet-50's
forward+backward at batch 16 took 3.3 s instead of 1.4 s (bench/results/allocator-cpu.json). The resident
set then stays at its high-water mark, which a served model's bounded batch bounds.
"""

import glob
import logging
import os
import sys
from typing import Literal

Allocator = Literal["auto", "jemalloc", "system"]
LIBRARY = "libjemalloc.so.2"
SEARCH = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib", "/opt/homebrew/lib")
CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
TRIED = "FISHERGUARD_ALLOCATOR_PRELOADED"  # set on the re-executed process: never re-execute twice

log = logging.getLogger("fisherguard")


def find_jemalloc() -> str | None:
    """The path of jemalloc's shared library on this machine, or None."""
    for pattern in SEARCH:
        for path in sorted(glob.glob(os.path.join(pattern, LIBRARY))):
            if os.path.isfile(path):
                return path
    return None


def in_use() -> str:
    """`jemalloc` when this process has jemalloc mapped, else `system`."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "system"
    except OSError:
        return "system"


def ensure(choice: Allocator) -> None:
    """Re-executes this very command line with jemalloc preloaded when `choice` asks for it and the
    process does not run on it yet; returns only when no re-execution is due."""
    if choice == "system" or in_use() == "jemalloc":
        return
    path = find_jemalloc()
    if os.environ.get(TRIED) or path is None:
        if choice == "jemalloc":
            where = "it did not load" if os.environ.get(TRIED) else f"no {LIBRARY} under {', '.join(SEARCH)}"
            raise ValueError(f"allocator 'jemalloc' asked for, but {where} (install libjemalloc2, or use --allocator system)")
        return
    preload = " ".join(filter(None, [path, os.environ.get("LD_PRELOAD", "")]))
    env = {"MALLOC_CONF": CONF, **os.environ, "LD_PRELOAD": preload, TRIED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
