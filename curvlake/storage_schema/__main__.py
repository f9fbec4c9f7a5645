"""``python -m curvlake.storage_schema [PATH]`` writes docs/SCHEMA.md (default) or PATH."""

import sys
from pathlib import Path

from curvlake.storage_schema import SPECS
from curvlake.storage_schema._docs import render_markdown

target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/SCHEMA.md")
target.write_text(render_markdown(SPECS))
print(f"wrote {target}")
