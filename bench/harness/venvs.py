"""The benchmark's own virtual environments under bench/.venv-*.

supervisord's import name is `supervisor`, the same as watchkeeper's package, so the two
cannot share a venv. The harness gets a third one of its own, so that what it measures with
(psutil) and the scheduler baseline (APScheduler) do not depend on either daemon's install.
Standard library only: this runs before any venv exists.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
SPEC_FILE = ".bench-spec"


def venv_specs() -> dict[str, list[str]]:
    """pip arguments of each venv by its name under bench/."""
    return {
        ".venv-harness": ["psutil>=5.9", "APScheduler>=3.11,<3.12"],
        # With the postgresql extra: bench/postgres_vs_sqlite.py runs in this venv too; with
        # the semantic extra, lazy_context.py --quick reports hybrid search beside lexical.
        ".venv-watchkeeper": ["-e", f"{REPO_DIR}[postgresql,semantic]"],
        ".venv-supervisord": ["supervisor==4.3.0"],
    }


def python_of(name: str) -> Path:
    return BENCH_DIR / name / "bin" / "python"


def _fingerprint(args: list[str]) -> str:
    """What the venv was built from: its pip arguments, and for the editable install the
    project's dependency list, so that a changed pyproject.toml rebuilds it."""
    text = "\n".join(args)
    pyproject = REPO_DIR / "pyproject.toml"
    if "-e" in args and pyproject.exists():
        text += "\n" + hashlib.sha256(pyproject.read_bytes()).hexdigest()
    return text


def ensure(name: str, args: list[str], log=print) -> Path:
    """Create (or rebuild) one venv unless it already matches `args`; return its python."""
    path = BENCH_DIR / name
    python = python_of(name)
    wanted = _fingerprint(args)
    marker = path / SPEC_FILE
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    log(f"creating {path.relative_to(REPO_DIR)} ({' '.join(args)})")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *args], check=True)
    marker.write_text(wanted)
    return python


def ensure_all(log=print) -> dict[str, Path]:
    pythons = {name: ensure(name, args, log) for name, args in venv_specs().items()}
    byte_compile(pythons[".venv-watchkeeper"])
    return pythons


def byte_compile(python: Path) -> None:
    """Compile the editable checkout's modules, as pip does for an installed package (and
    for supervisord): where PYTHONDONTWRITEBYTECODE is set, the daemon would otherwise
    compile every module from source at each start."""
    subprocess.run([str(python), "-m", "compileall", "-q", str(REPO_DIR / "supervisor")],
                   check=True, env={k: v for k, v in os.environ.items()
                                    if k != "PYTHONDONTWRITEBYTECODE"})


def in_harness_venv() -> bool:
    return Path(sys.prefix).resolve() == (BENCH_DIR / ".venv-harness").resolve()


def reexec_in_harness(script: Path, argv: list[str]) -> None:
    python = python_of(".venv-harness")
    os.execv(str(python), [str(python), str(script), *argv])
