#!/usr/bin/env python3
"""Writes the GPU peer-comparison table of benchmarks/RESULTS.md from benchmarks/results/*.json.

The table sits between the markers below; everything else in RESULTS.md is left as it is.

  python3 benchmarks/peer/results_table.py [benchmarks/results/2026-11-22-h200.json ...]
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEGIN, END = "<!-- peer-results:begin -->", "<!-- peer-results:end -->"


def shape_text(shape):
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def table(result):
    lines = [
        f"{result['date']} · {result['gpu']} ({result['sms']} SMs) · torch {result['torch']}, cuDNN "
        f"{result['cudnn']}, flash-linear-attention {result['fla']} · bf16, causal · commit {result['commit']}",
        "",
        "Command:",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        "| op | shape | pass | dash ms | dash TFLOP/s | peer | peer ms | peer / dash |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for r in result["records"]:
        if r["ms"] is None:
            lines.append(f"| {r['op']} | {shape_text(r['shape'])} | {r['pass']} | — | — | {r.get('note', '')} | | |")
            continue
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] else "—"
        peer_ms = f"{r['peer_ms']:.3f}" if r["peer_ms"] is not None else "—"
        lines.append(f"| {r['op']} | {shape_text(r['shape'])} | {r['pass']} | {r['ms']:.3f} | {r['tflops']} | "
                     f"{r['peer'] or '—'} | {peer_ms} | {ratio} |")
    return "\n".join(lines)


def main():
    files = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
    if not files:
        sys.exit("no results/*.json to tabulate")
    sections = []
    for path in files:
        with open(path) as f:
            result = json.load(f)
        # Per-operator records (bench_ops.py); the search step's results have their own table.
        if result.get("records") and "op" in result["records"][0]:
            sections.append(f"### {os.path.basename(path)}\n\n" + table(result))
    block = BEGIN + "\n" + "\n\n".join(sections) + "\n" + END
    results_md = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    with open(results_md) as f:
        text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## GPU: dash against its peers\n\n" + block + "\n"
    with open(results_md, "w") as f:
        f.write(text)
    print(f"updated {results_md} from {len(files)} file(s)")


if __name__ == "__main__":
    main()
