#!/usr/bin/env python
"""Table and plot of the quality grid from whatever has finished (also a partial grid).

    .venv/bin/python bench/quality_report.py [--out bench/out/quality] [--results ...] [--plot ...]

The same as ``bench/quality.py --report``: gathers every summary.json under --out into
--results (bench/results/quality.json), prints a Markdown table and writes --plot
(bench/results/quality.png).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

if __name__ == "__main__":
    quality.main(["--report", *sys.argv[1:]])
