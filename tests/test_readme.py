"""The README's usage example runs as written."""
import re

from helpers import ROOT


def test_readme_usage_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Use it in your own loop\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    iso = scope["iso"]
    assert iso.state == "isolating" and iso.protected_fraction() > 0
    assert len(iso.history) >= 1
