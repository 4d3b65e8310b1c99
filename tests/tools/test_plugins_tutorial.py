"""docs/plugins.md works verbatim: its `samplerlab-new-plugin` commands make the package; every
Python block headed by a file name (``# my_samplers/ralston.py``) is that generated file, character
for character (and generated files import only ``framework.plugin`` and ``framework.testing``:
tests/testing/test_plugin_kit.py); the package is found through its entry point; and the section-7 sweep
plus its script, run as written, reproduce the table printed below them (to its three significant
figures).

The package is registered as an installed distribution with a temporary dist-info on sys.path
(tests/distributions.py); the real ``pip install`` and the generated tests run in
tests/testing/test_plugin_kit.py."""
from __future__ import annotations

import contextlib
import io
import math
import re
import shlex
from pathlib import Path

import pytest

from framework.entry.cli import main, plugins_main
from framework.tools.newplugin import main as new_plugin
from tests.distributions import installed_in_place

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(DOC.read_text()) if kind == lang]


def file_blocks() -> dict[str, str]:
    """Python blocks whose first line is ``# <path>``: path (in the package's project) → the code below it."""
    out = {}
    for body in blocks("python"):
        first, _, rest = body.partition("\n")
        if re.fullmatch(r"# [\w/]+\.py", first):
            out[first[2:]] = rest
    return out


def commands(program: str) -> list[list[str]]:
    """The ``program`` command lines of the doc's bash blocks (comments dropped, continuations joined)."""
    lines = "\n".join(blocks("bash")).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith(program + " ")]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The doc's package, made by the doc's own commands, installed for discovery."""
    root = tmp_path_factory.mktemp("tutorial")
    made = commands("samplerlab-new-plugin")
    assert len(made) >= 2, "docs/plugins.md lost its samplerlab-new-plugin commands"
    for argv in made:
        assert new_plugin(argv[1:] + ["--dest", str(root)]) == 0, argv
    project = root / "my_samplers"
    with installed_in_place(project, root / "site"):
        yield project


def test_code_blocks_are_the_generated_files(package):
    shown = file_blocks()
    assert {"my_samplers/ralston.py", "my_samplers/brightness.py", "tests/test_ralston.py",
            "tests/test_brightness.py"} <= set(shown)
    for path, code in shown.items():
        generated = (package / path).read_text()
        assert code == generated, f"docs/plugins.md's {path} differs from what samplerlab-new-plugin writes"
    yaml = (package / "my_samplers" / "conf" / "solver" / "ralston.yaml").read_text().strip()
    assert f"one line, `{yaml}`" in DOC.read_text()


def test_plugins_are_listed_with_their_distribution(package, capsys):
    assert [argv[1:] for argv in commands("samplerlab-plugins")] == [[]]
    assert plugins_main([]) == 0
    out = capsys.readouterr().out
    for name in ("ralston", "brightness"):
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
        assert line.split()[1] == "my-samplers", line


def _table(text: str) -> dict[tuple[str, int], tuple[float, float]]:
    """(solver, steps) → (nfe, rmse) from a markdown table's rows."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = (float(cells[2]), float(cells[3]))
    return rows


def test_comparison_sweep_reproduces_the_table(package, tmp_path, monkeypatch):
    """Section 7: the sweep command and the script, verbatim, in a fresh folder."""
    (bash,) = [b for b in blocks("bash") if "samplerlab -m" in b]
    command, _, rest = bash.partition("python - <<'EOF'\n")
    script = rest.rsplit("EOF", 1)[0]
    argv = shlex.split(command.replace("\\\n", " "), comments=True)
    assert argv[0] == "samplerlab"
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(script, f"{DOC}:section 7", "exec"), {"__name__": "__main__"})
    measured = _table(out.getvalue())
    shown = _table(DOC.read_text().split(bash, 1)[1])
    assert set(measured) == set(shown) and len(shown) == 12
    for key, (nfe, rmse) in shown.items():
        assert measured[key][0] == nfe, key  # counts
        unit = 10 ** (math.floor(math.log10(rmse)) - 2)  # the table's third significant figure
        assert abs(measured[key][1] - rmse) <= unit * 1.01, (key, measured[key][1], rmse)
