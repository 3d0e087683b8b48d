"""What the benchmark scripts share (they run as `python bench/<name>.py`, so bench/ is on sys.path)."""
import json
import os


def write_rows(rows: list[dict], path: str | None) -> None:
    """Save a table's rows as JSON when a path is given."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")
