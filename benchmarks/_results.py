"""What every benchmark does with its results: one JSON file beside the printed table."""
from __future__ import annotations

import json
import os
from typing import Any


def write_results(path: str, result: Any) -> None:
    """Write ``result`` as indented JSON to ``path`` (folders made as needed) and say where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
