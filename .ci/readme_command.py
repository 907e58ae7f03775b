"""Print the Nth one-line shell block of the README's Quickstart (1 = run, 2 = tests).

.ci/run executes block 2, so CI runs exactly what the README tells a newcomer to run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def quickstart_blocks(readme: str) -> list[str]:
    section = re.search(r"^## Quickstart\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if section is None:
        raise SystemExit("README.md has no '## Quickstart' section")
    return [b.strip() for b in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", section.group(1),
                                          re.S | re.M)]


if __name__ == "__main__":
    blocks = quickstart_blocks((Path(__file__).resolve().parents[1] / "README.md").read_text())
    print(blocks[int(sys.argv[1]) - 1])
