"""Every Python snippet of the docs runs as written: README.md, examples/**/*.md and the example scripts.

Each ```python block runs on its own in a fresh interpreter whose working directory is an
empty temporary folder, bounded in time. Markers (a comment line in the block or script,
visible to readers on purpose) say how, never silently:

- ``# doc-test: skip (reason)``: not run; the reason is required and the skips are listed
  (``pytest -rs tests/test_docs.py`` shows them; ``test_skipped_snippets_are_listed`` prints them).
- ``# doc-test: launch -n 2 --servers 1``: run under ``luoshu launch`` with those options.
  A block that calls ``distributed.init(`` without a marker runs under ``luoshu launch -n 2``.
- in an example script, ``# doc-test: args --max-iter 5`` is its quick mode and
  ``# doc-test: needs other.py`` runs `other.py` (with its own quick args) first in the same
  folder. An example script (not a ``_helper.py``) without ``args`` or ``skip`` fails the test,
  so a new example cannot go unchecked. The example runs are ``slow`` (``pytest -m slow tests/test_docs.py``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"^[ \t]*#[ \t]*doc-test:[ \t]*(?P<kind>[a-z]+)[ \t]*(?P<rest>.*?)[ \t]*$", re.M)
KINDS = {"skip", "launch", "args", "needs"}
TIMEOUT_S = 180


@dataclasses.dataclass
class Snippet:
    """One runnable piece of the docs: where it is, its code, and how its markers say to run it."""

    where: str  # "README.md:42" (the line of the opening fence) or "examples/ctr/wdl.py"
    code: str
    markers: dict[str, str]

    @property
    def skip_reason(self) -> str | None:
        return self.markers.get("skip")

    @property
    def launch_args(self) -> list[str] | None:
        if "launch" in self.markers:
            return shlex.split(self.markers["launch"]) or ["-n", "2"]
        if re.search(r"\bdistributed\.init\(", self.code):
            return ["-n", "2"]
        return None


def parse_markers(code: str, where: str) -> dict[str, str]:
    markers = {}
    for m in MARKER.finditer(code):
        kind, rest = m["kind"], m["rest"]
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown doc-test marker {kind!r}; the markers are {sorted(KINDS)}")
        if kind == "skip" and not re.fullmatch(r"\(.*\S.*\)", rest):
            raise ValueError(f"{where}: '# doc-test: skip' needs a reason in parentheses, found {rest!r}")
        markers[kind] = rest.strip("()") if kind == "skip" else rest
    return markers


def markdown_snippets(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[Snippet]:
    """The ```python (or ```py) blocks of a Markdown file, in order."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m["lang"].strip().split(" ")[0].lower() not in ("python", "py", "python3"):
            continue
        indent = len(m["indent"])
        body = "".join(
            line[indent:] if line[:indent].isspace() else line for line in m["body"].splitlines(keepends=True)
        )
        where = f"{path.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}"
        out.append(Snippet(where, body, parse_markers(body, where)))
    return out


def doc_files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    return [root / "README.md", *sorted((root / "examples").glob("**/*.md"))]


def example_scripts(root: pathlib.Path = ROOT) -> list[Snippet]:
    out = []
    for path in sorted((root / "examples").glob("**/*.py")):
        if path.name.startswith("_"):
            continue  # helpers imported by the examples, run through them
        where = str(path.relative_to(root))
        out.append(Snippet(where, path.read_text(), parse_markers(path.read_text(), where)))
    return out


def run_python(args: list[str], cwd: pathlib.Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Runs `python args...` in `cwd` in its own session; the whole process group dies on timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the interpreter, a launcher and everything it started
        out, err = proc.communicate()
        return subprocess.CompletedProcess(args, -9, out, err + f"\n[doc test] killed after {timeout} s")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run_snippet(snippet: Snippet, cwd: pathlib.Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    script = cwd / "snippet.py"
    script.write_text(snippet.code)
    launch = snippet.launch_args
    args = [str(script)] if launch is None else ["-m", "luoshu.distributed.launch", *launch, str(script)]
    return run_python(args, cwd, timeout)


def _failure(where: str, result: subprocess.CompletedProcess) -> str:
    return f"{where} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


DOC_SNIPPETS = [s for f in doc_files() for s in markdown_snippets(f)]
EXAMPLES = example_scripts()


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("snippet", DOC_SNIPPETS, ids=[s.where for s in DOC_SNIPPETS])
def test_doc_snippet_runs_as_written(snippet, tmp_path):
    if snippet.skip_reason is not None:
        pytest.skip(f"{snippet.where}: doc-test skip ({snippet.skip_reason})")
    result = run_snippet(snippet, tmp_path)
    assert result.returncode == 0, _failure(snippet.where, result)


@pytest.mark.slow  # each generates its Parquet data: ~5-12 s a script on 2 cores, ~40 s in all
@pytest.mark.timeout(2 * TIMEOUT_S + 30)
@pytest.mark.parametrize("script", EXAMPLES, ids=[s.where for s in EXAMPLES])
def test_example_script_runs_in_its_quick_mode(script, tmp_path):
    if script.skip_reason is not None:
        pytest.skip(f"{script.where}: doc-test skip ({script.skip_reason})")
    assert "args" in script.markers, (
        f"{script.where}: an example needs a quick mode the doc test can run "
        "('# doc-test: args ...') or '# doc-test: skip (reason)'"
    )
    by_name = {pathlib.Path(s.where).name: s for s in EXAMPLES}
    chain = [by_name[name] for name in shlex.split(script.markers.get("needs", ""))] + [script]
    for step in chain:
        result = run_python([str(ROOT / step.where), *shlex.split(step.markers.get("args", ""))], tmp_path)
        assert result.returncode == 0, _failure(step.where, result)


def test_skipped_snippets_are_listed():
    skipped = [f"{s.where}: {s.skip_reason}" for s in DOC_SNIPPETS + EXAMPLES if s.skip_reason is not None]
    print("doc snippets not run:", *skipped or ["none"], sep="\n  ")
    assert all(reason.split(": ", 1)[1].strip() for reason in skipped)


def test_the_doc_test_sees_every_block_and_fails_a_broken_one(tmp_path):
    """The checker itself: fences at any indent, markers, launch detection, and a failing block fails."""
    doc = tmp_path / "README.md"
    doc.write_text(
        "text\n```python\nimport sys\nsys.exit(3)\n```\n\n- item\n  ```py\n  x = 1\n  ```\n"
        "```bash\nexit 1\n```\n```python\n# doc-test: skip (needs a GPU)\nraise SystemExit(1)\n```\n"
        "```python\nimport luoshu as ls\nls.distributed.init()\n```\n"
    )
    found = markdown_snippets(doc, tmp_path)
    assert [s.where for s in found] == ["README.md:2", "README.md:8", "README.md:14", "README.md:18"]
    assert found[1].code == "x = 1\n"
    assert found[2].skip_reason == "needs a GPU" and found[3].launch_args == ["-n", "2"]
    assert found[0].launch_args is None
    assert run_snippet(found[0], tmp_path, timeout=60).returncode == 3
    assert run_snippet(found[1], tmp_path, timeout=60).returncode == 0
    with pytest.raises(ValueError, match="needs a reason"):
        parse_markers("# doc-test: skip\n", "x")
    with pytest.raises(ValueError, match="unknown doc-test marker"):
        parse_markers("# doc-test: skipp (typo)\n", "x")
