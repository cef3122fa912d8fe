"""Every command that README.md and docs/*.md show exists after the documented setup, as a user would type it.

The commands are read from the Markdown itself (fenced bash blocks and inline code), so a newly documented
tool is covered without touching this file. For each tool, ``<tool> --help`` runs in a fresh login shell with
a clean environment and only the documented setup sourced: ``source scripts/env.sh`` (a machine without ROS)
and ``source install/setup.bash`` (a colcon workspace). Every ``--flag`` a documented command line uses must
appear in that tool's ``--help``, so the docs cannot drift from the argument parsers. ``python -m`` modules and
``ros2 run ovseg_ros <exe>`` executables are checked the same way (``ros2`` itself is not installable here:
its executable is run directly from the install space's ``lib/ovseg_ros/``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TOOL = re.compile(r"^ovseg-[a-z0-9]+(?:-[a-z0-9]+)*$")
#: The tiny test architectures (``ovseg-tiny-vit``) are model names, not commands.
MODEL_NAMES = {p.stem for p in (ROOT / "ovseg_ros" / "core" / "model_configs").glob("*.json")}


def _command_lines(text: str) -> list[str]:
    """Shell command lines of fenced ``bash`` blocks (continuations joined) and inline code spans."""
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                lines.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [m.strip() for m in re.findall(r"`([^`\n]+)`", prose)]
    return lines


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain split is enough to find tools and flags
        return line.split()


def documented() -> dict[tuple[str, str], set[str]]:
    """{(kind, name): flags used with it}: kind ``tool`` (console script), ``module`` (python -m), ``ros2``."""
    found: dict[tuple[str, str], set[str]] = {}
    for doc in DOCS:
        for line in _command_lines(doc.read_text()):
            words = _words(line)
            if not words:
                continue
            key = None
            if TOOL.match(words[0]) and words[0] not in MODEL_NAMES:
                key, rest = ("tool", words[0]), words[1:]
            elif "-m" in words[:-1] and words[words.index("-m") + 1].startswith("ovseg_ros"):
                i = words.index("-m")
                key, rest = ("module", words[i + 1]), words[i + 2:]
            elif words[:3] == ["ros2", "run", "ovseg_ros"] and len(words) > 3:
                key, rest = ("ros2", words[3]), words[4:]
            if key is None:
                continue
            flags = {w.split("=")[0] for w in rest if re.match(r"^--?[a-zA-Z][\w-]*", w)}
            found.setdefault(key, set()).update(flags)
    return found


DOCUMENTED = documented()


def _shell(setup: str, command: str) -> subprocess.CompletedProcess:
    """``command`` in ``bash -lc`` with a clean environment (HOME, a system PATH) and ``setup`` sourced first."""
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    if os.environ.get("OVSEG_VENV"):  # where scripts/setup.sh put the venv when not in ./.venv
        env["OVSEG_VENV"] = os.environ["OVSEG_VENV"]
    script = f"cd {shlex.quote(str(ROOT))} && {setup} && {command}"
    return subprocess.run(["bash", "-lc", script], env=env, capture_output=True, text=True, timeout=180)


def test_the_docs_document_the_tools() -> None:
    """The extraction itself works: the three original tools and the eval module are found."""
    tools = {name for kind, name in DOCUMENTED if kind == "tool"}
    assert {"ovseg-eval", "ovseg-segment", "ovseg-nav2-params"} <= tools
    assert ("module", "ovseg_ros.eval") in DOCUMENTED


@pytest.mark.parametrize("tool", sorted(name for kind, name in DOCUMENTED if kind == "tool"))
def test_tool_is_packaged_both_ways(tool: str) -> None:
    """A pip install (setup.py console_scripts) and a colcon build (CMake launchers) both provide the tool."""
    assert re.search(rf'"{re.escape(tool)}\s*=\s*ovseg_ros[\w.]*:main"', (ROOT / "setup.py").read_text()), \
        f"{tool} is missing from setup.py console_scripts"
    assert f'"{tool.replace("-", "_")}=ovseg_ros.' in (ROOT / "CMakeLists.txt").read_text(), \
        f"{tool} is missing from the launchers of CMakeLists.txt"


SETUPS = {"env.sh": "source scripts/env.sh", "workspace": "source install/setup.bash"}


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("kind,name", sorted(DOCUMENTED), ids=[f"{k}:{n}" for k, n in sorted(DOCUMENTED)])
def test_documented_command_answers_help(kind: str, name: str, setup: str) -> None:
    if kind == "tool":
        command = shlex.quote(name)
    elif kind == "module":
        command = f"python3 -m {shlex.quote(name)}"
        if setup == "workspace":
            pytest.skip("python -m needs the venv's interpreter: documented with scripts/env.sh only")
    else:
        exe = ROOT / "install" / "ovseg_ros" / "lib" / "ovseg_ros" / name
        assert exe.is_file() and os.access(exe, os.X_OK), f"`ros2 run ovseg_ros {name}` has no executable {exe}"
        command = shlex.quote(str(exe))
    proc = _shell(SETUPS[setup], f"{command} --help")
    assert proc.returncode == 0, f"`{command} --help` after `{SETUPS[setup]}`: rc {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "usage:" in proc.stdout
    missing = sorted(f for f in DOCUMENTED[(kind, name)] if f not in proc.stdout)
    assert not missing, f"the docs use {missing} with {name}, which its --help does not know"
    assert "``" not in proc.stdout and ":class:" not in proc.stdout, "--help shows raw reStructuredText"
