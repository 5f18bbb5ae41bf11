"""README.md's code blocks, for the tests that run them as written."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def snippet(heading: str, index: int = 0, language: str = "python") -> str:
    """The ``index``-th ```language block of the README section titled ``heading``
    (up to the next heading of any level)."""
    with open(README) as f:
        text = f.read()
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"README has no section {heading!r}"
    blocks = re.findall(rf"^```{language}\n(.*?)^```", match.group(1), re.M | re.S)
    assert len(blocks) > index, f"README section {heading!r} has {len(blocks)} {language} block(s)"
    return blocks[index]
