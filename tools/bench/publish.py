#!/usr/bin/env python3
"""Puts one GPU benchmark run into the repository: its log and numbers under benchmarks/
(named by date and GPU), and its tables into BENCHMARKS.md between the gpu-table markers.

    python3 tools/bench/publish.py DIR    # DIR: the run's output (bench.log, table.md, results.json)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BEGIN, END = "<!-- gpu-table:begin -->", "<!-- gpu-table:end -->"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    args = ap.parse_args()
    with open(os.path.join(args.dir, "results.json")) as f:
        results = json.load(f)
    run = results.get("run", {})
    if run.get("dry_run"):
        raise SystemExit("publish: this is a dry run on the CPU, not GPU results")
    gpu = results.get("roofline", {}).get("gpu") or "unknown-gpu"
    date = (run.get("date") or "undated")[:10]
    stem = f"{date}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}"
    dest = os.path.join(ROOT, "benchmarks")
    os.makedirs(dest, exist_ok=True)
    shutil.copyfile(os.path.join(args.dir, "bench.log"), os.path.join(dest, f"{stem}.log"))
    shutil.copyfile(os.path.join(args.dir, "results.json"), os.path.join(dest, f"{stem}.json"))

    with open(os.path.join(args.dir, "table.md")) as f:
        table = f.read().strip()
    # The report's own title is BENCHMARKS.md's; its sections go one level down.
    table = re.sub(r"^# .*\n", "", table)
    table = re.sub(r"^(#+) ", r"#\1 ", table, flags=re.M)
    section = f"{BEGIN}\nRaw log: [benchmarks/{stem}.log](benchmarks/{stem}.log); numbers: [benchmarks/{stem}.json](benchmarks/{stem}.json).\n\n{table}\n{END}"
    path = os.path.join(ROOT, "BENCHMARKS.md")
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section")
    doc = doc[: doc.index(BEGIN)] + section + doc[doc.index(END) + len(END) :]
    with open(path, "w") as f:
        f.write(doc)
    print(f"publish: BENCHMARKS.md updated; benchmarks/{stem}.log and .json written")


if __name__ == "__main__":
    main()
