"""Everything the code and notebooks cite lives in the repository, and the docs' links resolve."""
import json
import re
import subprocess

import pytest

from helpers import ROOT

# Developer-only notes that a user's clone does not have: citing them sends readers nowhere.
PRIVATE = ("CPU_STUDY", "ENGINE_NOTES", "SCIENCE_AUDIT", "RELATED_METHODS", "LAYOUT_SKETCH",
           "shared/reference", "PAPERS.md")
SCANNED = ("epi/", "notebooks/", "docs/", "data/", "examples/", "README.md")
TEXT = (".py", ".md", ".ipynb", ".yaml", ".yml", ".cfg", ".toml", ".txt", ".json")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def repo_files():
    """Return the repository's files (tracked or new but not ignored) under the scanned paths."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the list of repository files is unknown")
    return sorted({ROOT / f for f in out.splitlines() if f.endswith(TEXT) and (ROOT / f).is_file()})


def markdown_of(path):
    """Return the markdown a reader sees: the file, or a notebook's markdown cells."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


def slugs(markdown):
    """Return the anchors GitHub gives the headings of a markdown text."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out | set(re.findall(r'<a id="([^"]+)"></a>', markdown))  # explicit anchors (docs/GLOSSARY.md)


def broken_links(path):
    """Return the relative links of a markdown file or notebook whose file (or heading) does not exist."""
    bad = []
    for target in LINK.findall(markdown_of(path)):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text(encoding="utf-8")):
            bad.append(target)
    return bad


def test_nothing_cites_notes_outside_the_repository():
    files = repo_files()
    assert any(f.name == "BACKGROUND.md" for f in files)  # the scan sees the docs at all
    hits = [f"{f.relative_to(ROOT)}: {word}" for f in files
            for word in PRIVATE if word in f.read_text(encoding="utf-8", errors="replace")]
    assert not hits, "cite docs/BACKGROUND.md, docs/CPU_FINDINGS.md or docs/EXACTNESS.md instead:\n" + "\n".join(hits)


def test_relative_links_in_docs_readme_and_notebooks_resolve():
    pages = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "data" / "README.md"]
    pages += sorted((ROOT / "notebooks").glob("*.ipynb"))
    bad = {str(p.relative_to(ROOT)): broken_links(p) for p in pages}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_link_checker_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Q2'. Pretrained base, then one task\n<a id=\"term\"></a>**term**\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#q2-pretrained-base-then-one-task) [web](https://example.org/x.md) [t](a.md#term) "
                    "[gone](missing.md) [bad anchor](a.md#nope) ![img](also-missing.png)")
    assert broken_links(page) == ["missing.md", "a.md#nope"]


def _code_cells(nb: dict) -> list:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"
            and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("source", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_notebook_has_an_executed_copy_in_step_with_its_source(source):
    """docs/notebooks/<name> (what GitHub readers open) runs the notebook's current code and shows its figures."""
    copy = ROOT / "docs" / "notebooks" / source.name
    assert copy.is_file(), f"{copy} is missing: run `make render`"
    rendered, original = json.loads(copy.read_text()), json.loads(source.read_text())
    assert _code_cells(rendered) == _code_cells(original), f"{copy} is stale: run `make render`"
    assert "Executed copy" in "".join(rendered["cells"][0]["source"])
    outputs = [o for c in rendered["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure in the executed copy"
    assert "/work/" not in copy.read_text() and str(ROOT) not in copy.read_text()  # no build-machine paths


def test_the_architecture_map_names_every_module():
    """docs/ARCHITECTURE.md is the newcomer's map: a module it does not name is a module nobody can find."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(ROOT / "epi")) for p in sorted((ROOT / "epi").rglob("*.py"))
               if p.name != "__init__.py" and f"{p.name}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
