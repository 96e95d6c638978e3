"""The repository describes itself consistently: one version string, and every spec reference
in the code and docs resolves to a section of docs/spec.md."""
import fnmatch
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

import pytest

import ree_kernels

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("*.py", "*.md", "*.cpp", "*.h", "*.cu", "*.cuh", "*.txt", "*.toml", "*.json", "Makefile", "CMakeLists.txt")
SKIP_DIRS = {".git", ".venv", "build", "dist", "runs", ".benchmarks", "__pycache__"}


def repo_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if any(fnmatch.fnmatch(name, pattern) for pattern in SOURCES):
                yield Path(folder) / name


def spec_sections():
    """The section numbers of docs/spec.md's headings: "1", "1.4", ..."""
    text = (ROOT / "docs" / "spec.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.MULTILINE))


def cited_sections(text):
    """Every section a "docs/spec.md §A" or "§A–§B" reference names, ranges expanded."""
    for match in re.finditer(r"spec\.md (§\d+(?:\.\d+)?(?:\s*[–-]\s*§?\d+(?:\.\d+)?)?)", text):
        ends = re.findall(r"\d+(?:\.\d+)?", match.group(1))
        if len(ends) == 1:
            yield ends[0]
            continue
        first, last = ends
        if "." in first:
            major, low = first.split(".")
            high = last.split(".")[-1]
            yield from (f"{major}.{k}" for k in range(int(low), int(high) + 1))
        else:
            yield from (str(k) for k in range(int(first), int(last) + 1))


def test_spec_has_the_numbered_sections_the_code_cites():
    sections = spec_sections()
    assert {str(k) for k in range(1, 8)} <= sections
    assert {f"1.{k}" for k in range(1, 12)} <= sections


def test_every_spec_reference_resolves():
    sections, missing, count = spec_sections(), [], 0
    for path in repo_files():
        for section in cited_sections(path.read_text(errors="replace")):
            count += 1
            if section not in sections:
                missing.append(f"{path.relative_to(ROOT)}: §{section}")
    assert count > 50, "the reference pattern found almost nothing: is it still the repository's?"
    assert not missing, "references to sections docs/spec.md lacks: " + ", ".join(missing)


def test_reference_parsing_expands_ranges():
    text = "docs/spec.md §1.5–§1.7 and docs/spec.md §2–§4 and docs/spec.md §6"
    assert list(cited_sections(text)) == ["1.5", "1.6", "1.7", "2", "3", "4", "6"]


def test_no_reference_to_a_spec_outside_the_repository():
    # Split so that this file does not match itself; \u00a7 is § as JSON writes it.
    pattern = re.compile(r"SPEC(?:\.md)?\s*(?:§|\\u00a7)|shared/" + "SPEC")
    offenders = [str(path.relative_to(ROOT)) for path in repo_files()
                 if pattern.search(path.read_text(errors="replace"))]
    assert not offenders, "cite docs/spec.md instead: " + ", ".join(offenders)


@pytest.mark.skipif(tomllib is None, reason="tomllib is Python 3.11+")
def test_one_version_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ree_kernels.__version__"}
    assert "version=" not in (ROOT / "setup.py").read_text()
    assert importlib.metadata.version("ree-kernels") == ree_kernels.__version__


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npz",
                  ".tgz", ".gz", ".tar", ".zip"}


def test_no_lfw_image_is_committed():
    """LFW's photographs stay outside the project (REE_LFW_DIR, docs/lfw.md): no JPEG or archive
    anywhere in the repository, and no image file at all under a path that carries LFW's name."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an sdist or wheel): nothing tracked to inspect")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert tracked, "git ls-files listed nothing"
    offenders = [path for path in tracked
                 if Path(path).suffix.lower() in IMAGE_SUFFIXES
                 and ("lfw" in path.lower() or Path(path).suffix.lower() in {".jpg", ".jpeg", ".tgz", ".npz"})]
    assert not offenders, "LFW images (or archives) must not be committed: " + ", ".join(offenders)
