"""README.md's code blocks, for the tests that run them as written."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def snippet(heading: str, index: int = 0, language: str = "python") -> str:
    """The ``index``-th ```language block of the README section titled ``heading``
    (up to the next heading of any level outside a code block)."""
    with open(README) as f:
        lines = f.read().splitlines(keepends=True)
    blocks, inside, fence, current = [], False, None, None
    for line in lines:
        title = re.match(r"#+ (.*)", line) if fence is None else None
        if title:
            inside = title.group(1).strip() == heading
            continue
        if line.startswith("```"):
            if fence is None:
                fence, current = line[3:].strip(), []
            else:
                if inside and fence == language:
                    blocks.append("".join(current))
                fence = None
            continue
        if fence is not None:
            current.append(line)
    assert len(blocks) > index, f"README section {heading!r} has {len(blocks)} {language} block(s)"
    return blocks[index]
