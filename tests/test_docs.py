"""The repository stands on its own: no citation of notes that do not ship with it, and every
repository path that the code or the docs mention exists.

Files are listed with ``git ls-files`` (tracked files plus new files git does not ignore),
or, without git (an unpacked archive), by walking the tree. Scanned: Python, Markdown, TOML,
YAML and shell files, the Makefile, and the scripts under ``scripts/`` and ``.ci/``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCANNED_SUFFIXES = (".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".ini")
SCANNED_NAMES = ("Makefile",)
SCRIPT_DIRS = ("scripts", ".ci")  # every file in these is a script, whatever its name
SKIPPED_DIRS = {
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    "lightning_logs",
    "runs",
    "node_modules",
}

# Notes that never shipped with the project. Built from pieces so that this file does not
# mention them itself.
_NOTES = "|".join(name + r"\.md" for name in ("SCIENCE", "DESIGN", "STYLE"))
FORBIDDEN = [
    re.compile(r"\b(?:" + _NOTES + r")\b"),  # case-sensitive: docs/science.md is fine
    re.compile(r"\bdesign" + r"\s+card", re.IGNORECASE),
]

# A repository path: one of these top-level folders, a slash, then path characters. Not
# preceded by a character that would make it the tail of something longer (a URL, an
# absolute or relative path elsewhere, a variable, a placeholder).
PATH_ROOTS = ("docs", "examples", "benchmarks", "lightning_fpq", "kernels", "scripts", "tests", ".ci")
PATH_RE = re.compile(r"(?<![\w.\-/~$<{@:%])((?:" + "|".join(re.escape(r) for r in PATH_ROOTS) + r")/[\w.\-/]*)")
GLOB_OR_PLACEHOLDER = set("*?[<{$")  # the path continues as a pattern: only its folder is checked
# Files that record history: exempt from the path check only (not from the citation check).
HISTORY = ("CHANGELOG.md",)


def repo_files() -> list[str]:
    """Repository-relative POSIX paths of the files that exist in the working tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout.decode("utf-8", "surrogateescape")
        files = sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(ROOT)
        files.extend((rel / name).as_posix() for name in filenames)
    return sorted(files)


def scanned(files: list[str]) -> list[str]:
    def wanted(path: str) -> bool:
        p = Path(path)
        return (
            p.suffix in SCANNED_SUFFIXES or p.name in SCANNED_NAMES or (len(p.parts) > 1 and p.parts[0] in SCRIPT_DIRS)
        )

    return [f for f in files if wanted(f)]


def read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8", errors="replace")


def known_paths(files: list[str]) -> set[str]:
    """Every file and every folder above one."""
    known = set(files)
    for f in files:
        parts = f.split("/")
        known.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return known


def mentioned_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of every repository path mentioned in ``text``.

    Trailing punctuation is dropped (a sentence ending in "docs/backends.md." mentions
    docs/backends.md); a path that goes on as a glob or a placeholder
    (``examples/configs/*.yaml``, ``examples/<name>/``) is checked up to its last complete folder.
    """
    found = []
    for match in PATH_RE.finditer(text):
        path = match.group(1)
        nxt = text[match.end() : match.end() + 1]
        if nxt and nxt in GLOB_OR_PLACEHOLDER:
            path = path.rsplit("/", 1)[0] if not path.endswith("/") else path
        path = path.rstrip(".-/")
        line = text.count("\n", 0, match.start()) + 1
        found.append((line, path))
    return found


def missing_paths(text: str, known: set[str]) -> list[tuple[int, str]]:
    return [(line, path) for line, path in mentioned_paths(text) if path not in known]


# A dotted name in the package: ``lightning_fpq.scaling.fitting.fit``, ``lightning_fpq.kernels``.
DOTTED_RE = re.compile(r"(?<![\w./])lightning_fpq(?:\.\w+)+")


def _module_file(parts: list[str], known: set[str]) -> str | None:
    """The file of module ``lightning_fpq.<parts>`` (``lightning_fpq.kernels`` lives in kernels/)."""
    base = ["kernels", *parts[1:]] if parts[:1] == ["kernels"] else ["lightning_fpq", *parts]
    stem = "/".join(base)
    for candidate in (stem + ".py", stem + "/__init__.py"):
        if candidate in known:
            return candidate
    return None


def module_names(path: str) -> set[str]:
    """The names a module defines or imports at its top level, and the string keys of its
    top-level dicts (a lazy ``__getattr__`` export table)."""
    names: set[str] = set()
    for node in ast.parse(read(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if isinstance(node.value, ast.Dict):
                names.update(
                    k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
                )
    return names


def missing_names(text: str, known: set[str]) -> list[tuple[int, str]]:
    """(line number, name) of dotted names whose module does not exist, or whose module does
    not mention the attribute that follows it (``module.attr`` or ``module.Class.method``)."""
    bad = []
    for match in DOTTED_RE.finditer(text):
        parts = match.group(0).split(".")[1:]
        for i in range(len(parts), -1, -1):  # the longest prefix that is a module
            module = _module_file(parts[:i], known)
            if module is not None:
                break
        rest = parts[i:]
        ok = module is not None and len(rest) <= 2
        if ok and rest:
            ok = rest[0] in module_names(module)
        if ok and len(rest) == 2:
            ok = re.search(r"\b" + re.escape(rest[1]) + r"\b", read(module)) is not None
        if not ok:
            bad.append((text.count("\n", 0, match.start()) + 1, match.group(0)))
    return bad


# ------------------------------------------------------------------------------- tests


def test_the_repository_lists_its_files():
    files = repo_files()
    assert "pyproject.toml" in files and "tests/test_docs.py" in files
    assert any(f.startswith("lightning_fpq/") for f in scanned(files))


def test_no_citation_of_notes_that_do_not_ship():
    hits = []
    for path in scanned(repo_files()):
        for number, line in enumerate(read(path).splitlines(), start=1):
            if any(p.search(line) for p in FORBIDDEN):
                hits.append(f"{path}:{number}: {line.strip()[:120]}")
    assert not hits, "cite docs/science.md or docs/architecture.md instead:\n" + "\n".join(hits)


def test_every_mentioned_repository_path_exists():
    files = repo_files()
    known = known_paths(files)
    problems = [
        f"{path}:{line}: {mentioned}"
        for path in scanned(files)
        if path not in HISTORY  # it names old paths on purpose ("X, was Y")
        for line, mentioned in missing_paths(read(path), known)
    ]
    assert not problems, "these paths are mentioned but do not exist:\n" + "\n".join(problems)


def _p(*parts: str) -> str:
    """A path built from its parts, so that this file's own text mentions no missing path."""
    return "/".join(parts)


def test_every_mentioned_module_exists():
    files = repo_files()
    known = known_paths(files)
    problems = [
        f"{path}:{line}: {name}"
        for path in scanned(files)
        if path not in HISTORY
        for line, name in missing_names(read(path), known)
    ]
    assert not problems, "these dotted names point to no module or attribute:\n" + "\n".join(problems)


def test_the_path_check_catches_a_bogus_reference_and_skips_what_is_not_a_path():
    known = known_paths(["docs/backends.md", "examples/configs/demo.yaml", "lightning_fpq/quantize.py"])
    bogus_bench, bogus_module = _p("benchmarks", "bench_nothing.py"), _p("lightning_fpq", "gone.py")
    text = "\n".join(
        [
            "See docs/backends.md, and lightning_fpq/quantize.py.",  # exist
            f"Run {bogus_bench} first.",  # bogus
            "https://github.com/org/repo/blob/main/" + _p("docs", "missing.md"),  # a URL: skipped
            "every examples/configs/*.yaml, examples/<dir>/x.py, docs/{a,b}",  # globs, placeholders
            "/abs/" + _p("tests", "nothing.py") + " and out_dir/" + _p("docs", "x.md"),  # tails of other paths
            f"`{bogus_module}`",  # bogus
        ]
    )
    assert missing_paths(text, known) == [(2, bogus_bench), (6, bogus_module)]
    assert mentioned_paths("docs/backends.md.")[0][1] == "docs/backends.md"
    assert mentioned_paths(_p("tests", "test_x.py") + "::test_y")[0][1] == _p("tests", "test_x.py")


def test_the_module_check_catches_a_bogus_name():
    known = known_paths(["lightning_fpq/__init__.py", "lightning_fpq/quantize.py", "kernels/__init__.py"])
    gone, attr = "lightning_fpq." + "gone", "lightning_fpq.quantize." + "no_such_function"
    text = f"lightning_fpq.quantize.quantize, lightning_fpq.kernels\n{gone}.x and {attr}"
    assert missing_names(text, known) == [(2, gone + ".x"), (2, attr)]


def test_the_forbidden_citations_are_recognised():
    assert any(p.search("see " + "SCIENCE" + ".md section 4") for p in FORBIDDEN)
    assert any(p.search("the " + "Design" + " Card says") for p in FORBIDDEN)
    assert not any(p.search("docs/science.md section 4, docs/architecture.md") for p in FORBIDDEN)
