"""`fisherguard serve` picks its memory allocator before torch loads (docs/deployment.md#memory)."""

import os
import subprocess
import sys

import pytest

from service.serve import allocator

PROBE = "from service.serve import allocator; allocator.ensure({!r}); print(allocator.in_use())"


def _probe(choice: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter that asks for `choice`, then says which allocator it runs on."""
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.TRIED)}
    return subprocess.run([sys.executable, "-c", PROBE.format(choice)], capture_output=True, text=True, timeout=60, env={**environ, **env})


def test_system_keeps_the_c_library_malloc() -> None:
    done = _probe("system")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["system"]


def test_auto_re_executes_under_jemalloc_when_the_machine_has_it() -> None:
    if allocator.find_jemalloc() is None:
        pytest.skip("no libjemalloc.so.2 here (apt-get install libjemalloc2)")
    done = _probe("auto")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["jemalloc"]  # printed once: the first process became the second


def test_auto_without_jemalloc_stays_on_the_c_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    monkeypatch.setattr(allocator, "in_use", lambda: "system")
    allocator.ensure("auto")  # returns: nothing to re-execute under


def test_jemalloc_asked_for_but_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    monkeypatch.setattr(allocator, "in_use", lambda: "system")
    with pytest.raises(ValueError, match=r"libjemalloc\.so\.2.*--allocator system"):
        allocator.ensure("jemalloc")


def test_a_preload_that_did_not_load_is_not_retried() -> None:
    """The marker of the re-executed process stops a loop when the preload silently fails."""
    done = _probe("auto", **{allocator.TRIED: "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["system"]
    failed = _probe("jemalloc", **{allocator.TRIED: "1"})
    assert failed.returncode != 0 and "did not load" in failed.stderr


def test_the_cli_refuses_an_unknown_allocator() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--allocator", "tcmalloc"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "invalid choice: 'tcmalloc'" in done.stderr


FAULTS = """
import resource, torch
from service.serve import allocator
allocator.ensure("jemalloc")
def touch():
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, freed at once: a large activation's life
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def _faults_per_touch(**env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.TRIED)}
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120, env={**environ, **env})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_jemalloc_keeps_freed_pages_for_reuse() -> None:
    """Under the service's MALLOC_CONF a large block freed and allocated again reuses its pages; under
    jemalloc's default decay every reuse page-faults its 16,384 pages afresh (what made ResNet-50's
    forward+backward 2.4× slower: docs/deployment.md#memory). A user's own MALLOC_CONF wins."""
    if allocator.find_jemalloc() is None:
        pytest.skip("no libjemalloc.so.2 here (apt-get install libjemalloc2)")
    kept = _faults_per_touch()
    purged = _faults_per_touch(MALLOC_CONF="")
    assert kept < 1000, kept
    assert purged > 8000, purged
