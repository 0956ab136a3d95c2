"""Turn a pytest-benchmark JSON file into the anybn-vs-naive ratio table of docs/benchmarks.md.

    python tests/benchmarks/ratios.py results.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    groups: dict[str, dict[str, dict]] = {}
    for b in benchmarks:
        groups.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b["stats"]
    lines = [
        "| benchmark | anybn median (ms) | naive median (ms) | naive / anybn |",
        "|---|---:|---:|---:|",
    ]
    for group in sorted(groups):
        a, n = groups[group]["anybn"], groups[group]["naive"]
        lines.append(
            f"| {group} | {a['median'] * 1e3:.3f} | {n['median'] * 1e3:.3f} | {n['median'] / a['median']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
