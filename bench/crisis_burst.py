"""Build the 4× burst archive from CrisisLexT26: every post of several crisis events
repeated under neighbouring ids (the same event time), as one CrisisLexT26 CSV.

Usage::

    python bench/crisis_burst.py [--data ../shared/data] [--events 8] [--copies 4]
                                 [--out bench/results/crisis_burst.csv]

The events are the first ``--events`` folders of ``crisislex_t26`` in name order. A
copy's id is the original snowflake id plus 1, 2, 3: the same millisecond (the time
bits are the id's upper 41), a different post. Prints the path and the row count. The
file is written under ``bench/results`` (ignored by git): the data stay in ../shared.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(data: Path, events: int, copies: int, out: Path) -> int:
    """Write the burst archive to ``out``; return its number of posts."""
    folders = sorted(p for p in (data / "crisislex_t26").iterdir() if p.is_dir())[:events]
    rows = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        header_written = False
        for folder in folders:
            source = next(folder.glob("*-tweets_labeled.csv"))
            with source.open(newline="", encoding="utf-8") as infile:
                reader = csv.reader(infile)
                header = next(reader)
                if not header_written:
                    writer.writerow(header)
                    header_written = True
                for row in reader:
                    if not row or not row[0].strip().isdigit():
                        continue
                    for copy in range(copies):
                        writer.writerow([str(int(row[0]) + copy), *row[1:]])
                        rows += 1
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--events", type=int, default=8)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "crisis_burst.csv")
    options = parser.parse_args()
    rows = build(options.data, options.events, options.copies, options.out)
    print(f"{options.out}: {rows} posts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
