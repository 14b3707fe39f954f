"""Rewrite the settings table in README.md from the code (`make docs`)."""

from __future__ import annotations

import re
from pathlib import Path

from cryptotui.config import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- settings:start -->\n).*?(<!-- settings:end -->)", re.DOTALL)

if __name__ == "__main__":
    text = README.read_text()
    README.write_text(BLOCK.sub(lambda m: m.group(1) + settings_table() + "\n" + m.group(2), text))
