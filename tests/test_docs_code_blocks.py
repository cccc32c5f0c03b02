"""Every code block of the documentation runs as written.

* Every fenced ```python block of README.md and docs/**/*.md is executed: a file's
  blocks in order, in one fresh namespace, in a subprocess (in an empty directory, with
  a timeout). A block that fails is reported with its file and line, its first line and
  the exception; the blocks after it still run (their failures say that an earlier block
  failed).
* A block preceded by a ``<!-- not-run: reason -->`` comment (on the line above its
  opening fence, blank lines allowed in between) is skipped; the reason is required. Use
  it only for what cannot run here (a GPU, a download, a cluster), and say so.
* A block preceded by ``<!-- torchrun: N -->`` is a complete script that is also run on
  its own under ``torchrun --nproc-per-node=N`` (CPU, gloo), besides running in its file's
  namespace: a block that shows torchrun use is tested under torchrun.
* Every ```bash (or ```sh, ```console) line that starts the main job or the study is
  parsed by that program's own argument parser (and, for the main job, checked against
  the ranks it would run on), so every option and value it shows is valid; every
  ``examples/...`` script it names exists.
* Every relative link (outside code blocks) points to a file that exists, and to a
  heading of it when it names one (GitHub's anchors).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(.*?)\s*-->\s*$")
TORCHRUN = re.compile(r"^\s*<!--\s*torchrun:\s*(\d+)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```+\s*([A-Za-z0-9_+-]*)")


class Block(NamedTuple):
    lang: str
    line: int  # line number (1-based) of the block's first code line in its file
    code: str
    skip: Optional[str]  # the not-run reason, or None
    torchrun: Optional[int] = None  # ranks to run it on as a script under torchrun


def blocks(text: str) -> List[Block]:
    """The fenced code blocks of Markdown ``text``, with their not-run marks.

    Raises ``ValueError`` for an unclosed fence or a not-run mark without a reason.
    """
    out: List[Block] = []
    lines = text.splitlines()
    i, mark, ranks = 0, None, None
    while i < len(lines):
        line = lines[i]
        m = NOT_RUN.match(line)
        if m:
            if not m.group(1):
                raise ValueError(f"line {i + 1}: <!-- not-run: --> needs a reason")
            mark = m.group(1)
            i += 1
            continue
        t = TORCHRUN.match(line)
        if t:
            ranks = int(t.group(1))
            i += 1
            continue
        f = FENCE.match(line)
        if f:
            indent, lang = f.group(1), f.group(2).lower()
            body, j = [], i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
                j += 1
            if j == len(lines):
                raise ValueError(f"line {i + 1}: unclosed code fence")
            out.append(Block(lang, i + 2, "\n".join(body) + "\n", mark, ranks))
            mark, ranks, i = None, None, j + 1
            continue
        if line.strip():
            mark = ranks = None  # a mark applies to the next block only, across blank lines
        i += 1
    return out


def doc_files() -> List[Path]:
    files = [ROOT / "README.md"]
    files += sorted((ROOT / "docs").glob("**/*.md"))
    return [f for f in files if f.exists()]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


#: runs in the subprocess: every block of one file, in order, in one namespace
RUNNER = r"""
import json, sys, traceback
name, blocks = sys.argv[1], json.load(open(sys.argv[2]))
ns = {"__name__": "__main__"}
failed = []
for line, code in blocks:
    try:
        exec(compile("\n" * (line - 1) + code, name, "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - report, go on with the next block
        first = code.strip().splitlines()[0] if code.strip() else ""
        after = " (an earlier block failed)" if failed else ""
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next)[-4:])
        failed.append(line)
        print(f"FAILED BLOCK {name}:{line}{after}: {first!r}\n  {type(e).__name__}: {e}\n{tb}",
              file=sys.stderr, flush=True)
print(json.dumps({"ran": len(blocks), "failed": failed}))
"""


def run_python_blocks(path: Path, tmp_path: Path, timeout: float = 280.0):
    """Run ``path``'s runnable python blocks; return ``(ran, failed lines, stderr)``."""
    runnable = [(b.line, b.code) for b in blocks(path.read_text())
                if b.lang in ("python", "py") and b.skip is None]
    if not runnable:
        return 0, [], ""
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(runnable))
    runner = tmp_path / "run_blocks.py"
    runner.write_text(RUNNER)
    work = tmp_path / "cwd"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(runner), str(path), str(spec)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        return len(runnable), [-1], proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["ran"], result["failed"], proc.stderr


# ---------------------------------------------------------------------------- shell lines
_TORCHRUN = ("torchrun",)


def _commands(code: str) -> List[List[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped,
    split at ``&&``, ``||``, ``;`` and ``|``, leading ``VAR=value`` assignments dropped."""
    text = re.sub(r"\\\n", " ", code)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        cmd: List[str] = []
        for w in words + [";"]:
            if w in ("&&", "||", ";", "|"):
                while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _launch(words: List[str]):
    """``(program, args, world)`` when ``words`` start the main job or the study, else None.

    program: ``"main"`` or ``"study"``; world: the ranks torchrun would start (1 otherwise).
    """
    world, i = 1, 0
    python = re.compile(r"^(python[0-9.]*|.*/python[0-9.]*)$")
    torchrun = bool(words) and (words[0] in _TORCHRUN or (
        python.match(words[0]) and words[1:3] == ["-m", "torch.distributed.run"]))
    if torchrun:
        i = 1 if words[0] in _TORCHRUN else 3
        nproc, nnodes = 1, 1
        while i < len(words) and words[i].startswith("-") and words[i] != "-m":
            opt, _, val = words[i].partition("=")
            if not val and opt in ("--nproc-per-node", "--nproc_per_node", "--nnodes"):
                i, val = i + 1, words[i + 1]
            if opt in ("--nproc-per-node", "--nproc_per_node") and val.isdigit():
                nproc = int(val)
            if opt == "--nnodes" and val.isdigit():
                nnodes = int(val)
            i += 1
        world = nproc * nnodes
        if i < len(words) and words[i] == "-m":
            module, args = words[i + 1], words[i + 2:]
        else:
            return None  # a script under torchrun
    elif words and words[0] == "avalanche-distributed-rehearsal":
        module, args = "avalanche_distributed_rehearsal", words[1:]
    elif words and python.match(words[0]) and len(words) > 2 and words[1] == "-m":
        module, args = words[2], words[3:]
    else:
        return None
    if module == "avalanche_distributed_rehearsal":
        return "main", args, world
    if module == "avalanche_distributed_rehearsal.study":
        return "study", args, world
    return None


def check_shell_block(code: str) -> List[str]:
    """Problems in one shell block: invalid options of the main job or the study, missing
    example scripts. Empty when it is fine."""
    from avalanche_distributed_rehearsal.app import cli
    from avalanche_distributed_rehearsal.app import study

    problems = []
    for words in _commands(code):
        for w in words:
            if re.match(r"^examples/[\w/.-]+\.(py|sbatch)$", w) and not (ROOT / w).exists():
                problems.append(f"{' '.join(words)}: no such file {w}")
        found = _launch(words)
        if found is None:
            continue
        program, args, world = found
        if "--help" in args or "-h" in args:
            continue
        try:
            if program == "main":
                cfg = cli.parse_args(args)
                cli.check_against_world(cfg, cli.n_classes_of(cfg), world)
            else:
                study.parse_args(args)
        except cli.UsageError as e:
            problems.append(f"{' '.join(words)}: {e}")
    return problems


# ---------------------------------------------------------------------------- the tests
def _file_param(path: Path):
    marks = [pytest.mark.timeout(300)]
    return pytest.param(path, id=_id(path), marks=marks)


@pytest.mark.parametrize("path", [_file_param(p) for p in doc_files()])
def test_python_blocks_run(path, tmp_path):
    ran, failed, stderr = run_python_blocks(path, tmp_path)
    assert not failed, f"{len(failed)} of {ran} python block(s) of {_id(path)} failed:\n{stderr}"


def _torchrun_blocks():
    return [pytest.param(path, b, id=f"{_id(path)}:{b.line}")
            for path in doc_files() for b in blocks(path.read_text())
            if b.torchrun and b.skip is None and b.lang in ("python", "py")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path, block", _torchrun_blocks())
def test_torchrun_blocks_run_under_torchrun(path, block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text("\n" * (block.line - 1) + block.code)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc-per-node={block.torchrun}", "--rdzv-backend=c10d",
                           "--rdzv-endpoint=127.0.0.1:0", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (f"{_id(path)}:{block.line} failed under torchrun with "
                                  f"{block.torchrun} ranks:\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("path", [_file_param(p) for p in doc_files()])
def test_shell_commands_are_valid(path):
    problems = []
    for b in blocks(path.read_text()):
        if b.lang in ("bash", "sh", "shell", "console") and b.skip is None:
            problems += [f"{_id(path)}:{b.line}: {p}" for p in check_shell_block(b.code)]
    assert not problems, "\n".join(problems)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set:
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def broken_links(path: Path) -> List[str]:
    """Relative links of ``path`` (outside code blocks) whose file or heading is missing."""
    problems, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                problems.append(f"{_id(path)}:{n}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{_id(path)}:{n}: {target}: no such heading")
    return problems


@pytest.mark.parametrize("path", [_file_param(p) for p in doc_files()])
def test_links_resolve(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- the machinery
DOC = """# t

```python
x = 1
```

<!-- not-run: needs a GPU -->

```python
raise SystemExit("never")
```

text

```python
y = x + 1
undefined_name
```

<!-- torchrun: 2 -->
```python
print(y)
```
"""


def test_extraction_marks_and_line_numbers():
    found = blocks(DOC)
    assert [(b.lang, b.line, b.skip, b.torchrun) for b in found] == [
        ("python", 4, None, None), ("python", 10, "needs a GPU", None), ("python", 16, None, None),
        ("python", 22, None, 2)]
    assert found[2].code == "y = x + 1\nundefined_name\n"
    with pytest.raises(ValueError, match="reason"):
        blocks("<!-- not-run: -->\n```python\nx\n```\n")
    with pytest.raises(ValueError, match="unclosed"):
        blocks("```python\nx\n")
    # a mark does not reach past text to a later block
    assert blocks("<!-- not-run: r -->\ntext\n```python\nx\n```\n")[0].skip is None


@pytest.mark.timeout(60)
def test_a_failing_block_is_reported_with_its_line(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    ran, failed, stderr = run_python_blocks(doc, tmp_path)
    assert ran == 3 and failed == [16]  # the skipped block never ran; the last one did
    assert f"FAILED BLOCK {doc}:16: 'y = x + 1'" in stderr and "NameError" in stderr
    assert f'File "{doc}", line 17' in stderr  # the traceback names the Markdown line


def test_link_checks(tmp_path):
    assert slug("Dark Experience Replay: `DistributedDER`") == "dark-experience-replay-distributedder"
    (tmp_path / "other.md").write_text("# A heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](other.md#a-heading) [web](https://x.org/y) [self](#top)\n# Top\n"
                   "[gone](missing.md) [bad](other.md#nope)\n```\n[in code](nothing.md)\n```\n")
    assert [p.split(": ", 1)[1] for p in broken_links(doc)] == [
        "missing.md: no such file", "other.md#nope: no such heading"]


def test_shell_checks():
    ok = ("pip install . && torchrun --standalone --nproc-per-node=2 -m avalanche_distributed_rehearsal\n"
          "python -m avalanche_distributed_rehearsal --methods ours der --epochs 2  # comment\n"
          "python -m avalanche_distributed_rehearsal.study --quick\n"
          "OMP_NUM_THREADS=1 python -m avalanche_distributed_rehearsal --help\n")
    assert check_shell_block(ok) == []
    bad = ("python -m avalanche_distributed_rehearsal --epochs 0\n"
           "torchrun --nproc-per-node 4 -m avalanche_distributed_rehearsal \\\n    --mem-size 2\n"
           "python -m avalanche_distributed_rehearsal.study --seeds x\n"
           "python examples/no_such_example.py\n"
           "avalanche-distributed-rehearsal --bogus\n")
    problems = check_shell_block(bad)
    assert len(problems) == 5, problems
    for needle in ("--epochs", "--mem-size (2) must be at least the number of ranks (4)", "--seeds",
                   "no such file examples/no_such_example.py", "unrecognized arguments"):
        assert any(needle in p for p in problems), (needle, problems)
