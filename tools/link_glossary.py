"""Link the first use of each glossary term in a notebook's markdown to docs/GLOSSARY.md (idempotent).

  python tools/link_glossary.py notebooks/04_multitask_sft_cpu.ipynb [...]

A term is linked once per notebook, at its first plain-text occurrence in a markdown cell (not in a heading, code
span, link or the Colab badge cell); a notebook that already links a term's anchor is left alone for that term.
"""
import json
import re
import sys
from pathlib import Path

GLOSSARY = "../docs/GLOSSARY.md"
# (pattern, anchor): the first match in a notebook's prose gets the link
TERMS = [
    (r"\bimportance\b", "importance"), (r"\bEMA\b", "ema"), (r"\bisolation ratio\b", "p"), (r"\bwarm-up\b", "warm-up"),
    (r"\brefresh(?:es)?\b", "refresh"), (r"\bchurn\b", "churn"), (r"\bJaccard\b", "jaccard"),
    (r"\bnoise floor\b", "noise-floor"), (r"\bdrift\b", "drift"), (r"\bscope\b", "scope"),
    (r"\brelease burst\b", "release-burst"), (r"\bcore regions?\b", "core-region"), (r"\bτ\b", "tau"),
    (r"\bSLERP\b", "slerp"), (r"\bStage 4\b", "stage-4"), (r"\bANS\b", "ans"),
    (r"\bnormali[sz]ed score\b", "ans"), (r"\bseesaw\b", "seesaw"), (r"\bforgetting\b", "forgetting"),
    (r"\bretention\b", "retention"), (r"\bBWT\b", "bwt"), (r"\barms?\b", "arm"),
    (r"\bverdict rule\b|\bone rule\b", "verdict-rule"), (r"\bprofile\b", "profile"), (r"`tiny-base`", "tiny-base"),
]
PROTECTED = re.compile(r"`[^`]*`|\[[^\]]*\]\([^)]*\)|<[^>]+>|https?://\S+")


def link_first(text: str, pattern: str, anchor: str) -> tuple:
    """Return (text with the first unprotected match linked, whether it linked): matches inside code spans, links
    (whose text may span lines), HTML tags and headings are skipped."""
    spans = [m.span() for m in PROTECTED.finditer(text)]
    for m in re.finditer(pattern, text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if text[line_start:].lstrip().startswith("#"):
            continue
        inside = [(a, b) for a, b in spans if a <= m.start() < b]
        # a backticked term (`tiny-base`) may be linked as a whole code span, never from inside a longer one
        if inside and not (pattern.startswith("`") and inside == [m.span()]):
            continue
        return text[:m.start()] + f"[{m.group(0)}]({GLOSSARY}#{anchor})" + text[m.end():], True
    return text, False


def link_notebook(path: Path) -> int:
    """Link the terms of one notebook in place; return how many links were added."""
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"][1:] if c["cell_type"] == "markdown"]   # cell 0: title and Colab badge
    added = 0
    for pattern, anchor in TERMS:
        if any(f"GLOSSARY.md#{anchor})" in "".join(c["source"]) for c in nb["cells"]):
            continue
        for c in cells:
            text, done = link_first("".join(c["source"]), pattern, anchor)
            if done:
                lines = text.split("\n")
                c["source"] = [ln + "\n" for ln in lines[:-1]] + [lines[-1]]
                added += 1
                break
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return added


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, link_notebook(Path(p)))
