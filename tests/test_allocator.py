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
