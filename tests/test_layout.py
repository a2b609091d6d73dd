"""The layering of docs/architecture.md, checked on the source: fisher ← core ← serve, core ← lab,
and `fisherguard serve` never loads the laboratory."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"

# package -> module prefixes its code may not import
FORBIDDEN = {
    "service/fisher": ("service.core", "service.serve", "service.lab", "service.cli", "fastapi", "starlette", "uvicorn"),
    "service/core": ("service.serve", "service.lab", "service.cli", "fastapi", "starlette", "uvicorn"),
    "service/serve": ("service.lab", "service.cli"),
    "service": ("tests", "bench"),
    "models": ("service", "tests", "bench"),
}


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def violations(package: str, prefixes: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported(path):
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    assert violations(package, FORBIDDEN[package]) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from service.lab import attacks\n    import fastapi.responses\n")
    assert {"service.lab", "service.lab.attacks", "fastapi.responses"} <= imported(bad)


def test_serving_never_loads_the_laboratory() -> None:
    code = (
        "import sys\n"
        "from service.cli import parser\n"
        "a = parser().parse_args(['serve', '--port', '0'])\n"
        "import service.serve.server, service.serve.app\n"
        "from service.serve.app import create_app\n"
        "create_app()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('service.lab', 'bench', 'tests'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
    assert a_command_that_does_load_it_is_seen()


def a_command_that_does_load_it_is_seen() -> bool:
    """The same probe after the evaluate command's import path: the laboratory shows up (so the probe can fail)."""
    code = "import sys\nfrom service.lab.evaluate import evaluate\nprint(any(m.startswith('service.lab') for m in sys.modules))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip() == "True"
