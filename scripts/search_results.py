#!/usr/bin/env python3
"""The search results of README.md: run them, then render them.

  search_results.py run --dash DASH --model MODEL --data TEXT --ops OPS --budgets B [B ...] --out DIR
      `dash prepare` once into DIR/prepare, then `dash search` and `dash eval` for every budget in
      DIR/<budget>/, each reading the one prepared candidates file. A budget whose eval.json exists is
      skipped and an interrupted search is resumed, so the same command continues a stopped run.
      Every command's output goes to a .log beside its results, and its wall time to DIR/run.json
      and DIR/commands.log.

  search_results.py render --out DIR [--readme README.md] [--figure docs/search_results.svg]
      One table per budget (the searched architecture and every baseline: KV-cache fraction,
      held-out KL and perplexity, passkey and needle accuracy per context and their mean), the
      tokens and time of preparation and search, and a figure of held-out KL against KV-cache
      fraction, written into the README between the search-results markers.

Python 3 standard library only.
"""

import argparse
import datetime
import html
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- search-results:begin -->"
END = "<!-- search-results:end -->"
# Settings that decide what a run computes: a folder keeps the ones it was started with.
SETTINGS = ("model", "tokenizer", "data", "eval_data", "ops", "device", "tokens", "prepare_tokens",
            "eval_tokens", "seq_len", "batch", "context", "seed", "retrieval_contexts",
            "retrieval_prompts", "random_baselines", "relaxation", "lr", "prepare_lr", "copy_fraction")
BASELINES = ("even", "first-K", "last-K", "random", "kl-guided")


def now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def budget_folder(budget):
    """`kv=0.25` -> `kv-0.25`: a folder name without `=`."""
    if not re.fullmatch(r"[a-z-]+=[0-9.]+", budget):
        raise SystemExit(f"--budgets: '{budget}' is not a budget such as kv=0.25 or softmax-layers=8")
    return budget.replace("=", "-")


# ---- run -------------------------------------------------------------------------------------

def commit_of_checkout():
    """HEAD of the checkout this script is in; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def host_description():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True)
        gpus = [g.strip() for g in out.stdout.splitlines() if g.strip()] if out.returncode == 0 else []
    except OSError:
        pass
    return {"cpu": f"{cpu} ({os.cpu_count()} threads)", "gpus": gpus}


def dash_options(a):
    """The options every stage shares; tool defaults where a setting is not given."""
    opts = ["--model", a.model]
    for flag, value in (("--tokenizer", a.tokenizer), ("--data", a.data), ("--eval-data", a.eval_data),
                        ("--prepare-tokens", a.prepare_tokens), ("--eval-tokens", a.eval_tokens),
                        ("--seq-len", a.seq_len), ("--batch", a.batch), ("--context", a.context),
                        ("--retrieval-prompts", a.retrieval_prompts),
                        ("--random-baselines", a.random_baselines), ("--relaxation", a.relaxation),
                        ("--lr", a.lr), ("--prepare-lr", a.prepare_lr), ("--copy-fraction", a.copy_fraction)):
        if value is not None:
            opts += [flag, str(value)]
    opts += ["--ops", a.ops, "--device", a.device, "--tokens", str(a.tokens), "--seed", str(a.seed),
             "--retrieval-contexts", ",".join(str(c) for c in a.retrieval_contexts)]
    return opts


def run_logged(command, log_path, record):
    """Runs command with its output to the terminal and to log_path; returns its record for run.json."""
    started = now()
    clock = datetime.datetime.now().timestamp()
    print(f"$ {shlex.join(command)}", flush=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        # The tool runs in a session of its own, so that it hears each interrupt once, from here:
        # at the first it stops at the end of a step, saves what it has and exits 130; a second
        # ends it at once. Its output is read to the end either way.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while True:
            try:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log.write(chunk)
            except KeyboardInterrupt:
                process.send_signal(signal.SIGINT)
        status = process.wait()
    return dict(record, command=command, started=started, status=status,
                wall_seconds=round(datetime.datetime.now().timestamp() - clock, 3),
                log=str(log_path.relative_to(log_path.parent.parent)))


def stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def run(a):
    # A wall-clock limit (timeout's SIGTERM) stops a stage as Ctrl-C does: a search keeps its checkpoint.
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = [budget_folder(b) for b in a.budgets]
    if len(set(folders)) != len(folders):
        raise SystemExit("--budgets: a budget given twice")
    settings = {k: getattr(a, k) for k in SETTINGS}
    state_path = out / "run.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"settings": settings, "budgets": [],
                                                                             "invocations": [], "commands": []}
    if state["settings"] != settings:
        differ = ", ".join(f"{k} {state['settings'].get(k)!r} -> {settings[k]!r}" for k in SETTINGS
                           if state["settings"].get(k) != settings[k])
        raise SystemExit(f"{out}: made with other settings ({differ}); give another --out")
    state["budgets"] += [b for b in a.budgets if b not in state["budgets"]]
    state["invocations"].append({"started": now(), "commit": a.commit or commit_of_checkout(),
                                 "host": host_description(),
                                 "command": shlex.join(["python3", *sys.argv])})

    def save():
        tmp = state_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(state_path)

    def step(stage, budget, folder, command):
        entry = run_logged(command, folder / f"{stage}.log", {"stage": stage, "budget": budget})
        state["commands"].append(entry)
        save()
        with open(out / "commands.log", "a") as log:
            log.write(f"{entry['started']}  {entry['wall_seconds']:9.1f} s  status {entry['status']}  "
                      f"{shlex.join(command)}\n")
        print(f"[{stage} {budget or ''}] {entry['wall_seconds']:.1f} s wall, status {entry['status']}", flush=True)
        if entry["status"] != 0:
            raise SystemExit(entry["status"])

    save()
    common = dash_options(a)
    prepare_dir = out / "prepare"
    prepare_dir.mkdir(exist_ok=True)
    candidates = prepare_dir / "candidates.safetensors"
    if not any(c["stage"] == "prepare" and c["status"] == 0 for c in state["commands"]):
        step("prepare", None, prepare_dir,
             [a.dash, "prepare", *common, "--budget", a.budgets[0], "--out", str(prepare_dir)])
    for budget, name in zip(a.budgets, folders):
        folder = out / name
        folder.mkdir(exist_ok=True)
        if (folder / "eval.json").exists():
            print(f"[{budget}] done: {folder / 'eval.json'}", flush=True)
            continue
        # The tool reads OUT/candidates.safetensors: every budget links the one prepared file.
        link = folder / "candidates.safetensors"
        if candidates.exists() and not link.exists():
            link.symlink_to(os.path.relpath(candidates, folder))
        stage = [*common, "--budget", budget, "--out", str(folder)]
        if not (folder / "arch.json").exists():
            resume = ["--resume"] if (folder / "search.ckpt").exists() else []
            step("search", budget, folder, [a.dash, "search", *stage, *resume])
        step("eval", budget, folder, [a.dash, "eval", *stage])
    state["invocations"][-1]["finished"] = now()
    save()
    print(f"done: {out}; render with\n  {shlex.join(['python3', sys.argv[0], 'render', '--out', str(out)])}")


# ---- render ----------------------------------------------------------------------------------

def context_label(c):
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def retrieval_cells(method, contexts):
    """Accuracies in column order (passkey per context, then needle per context); None where not scored."""
    r = method.get("retrieval", {})
    return [r.get(task, {}).get(str(c)) for task in ("passkey", "needle") for c in contexts]


def retrieval_mean(method, contexts):
    cells = [v for v in retrieval_cells(method, contexts) if v is not None]
    return sum(cells) / len(cells) if cells else None


def kv_fraction(method, evaluation):
    if "kv_fraction" in method:
        return method["kv_fraction"]
    if evaluation["budget"].startswith("kv="):
        return method["cost_fraction"]
    raise SystemExit(f"eval.json of {evaluation['budget']}: no kv_fraction (made by an older dash); run eval again")


def median_row(rows, contexts, evaluation):
    """The random baseline as one row: every column the median over its seeds."""
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None
    cells = [retrieval_cells(r, contexts) for r in rows]
    retrieval = {}
    for k, (task, c) in enumerate((t, c) for t in ("passkey", "needle") for c in contexts):
        value = med([cell[k] for cell in cells])
        if value is not None:
            retrieval.setdefault(task, {})[str(c)] = value
    return {"method": f"random (median of {len(rows)})", "kv_fraction": med([kv_fraction(r, evaluation) for r in rows]),
            "kl": med([r["kl"] for r in rows]), "ppl": med([r["ppl"] for r in rows]), "retrieval": retrieval}


def op_letter(op):
    return {"softmax": "S", "swa": "W", "gla": "G", "gdn": "D"}[op.split(":")[0]]


def percent(v):
    return "–" if v is None else f"{100 * v:.0f} %"


def number(v, digits=3):
    return "–" if v is None else f"{v:.{digits}g}"


def seconds(s):
    if s < 10:
        return f"{s:.1f} s"
    if s < 100:
        return f"{s:.0f} s"
    m, s = divmod(round(s), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def wall(commands, stage, budget=None):
    """Total wall time of a stage's successful and interrupted attempts (a resumed search counts both)."""
    times = [c["wall_seconds"] for c in commands if c["stage"] == stage and c["budget"] == budget]
    return sum(times) if times else None


def verdicts(searched, baselines, contexts):
    """Whether the searched architecture beats every baseline on KL and matches the best on retrieval."""
    same = [b["method"] for b in baselines if b.get("ops") == searched["ops"]]
    others = [b for b in baselines if b.get("ops") != searched["ops"]]
    best = min(others, key=lambda b: b["kl"], default=None)
    below = best is not None and searched["kl"] < best["kl"]
    kl_text = "yes" if below and not same else "no"
    if same:
        kl_text += f": {', '.join(same)} chose the same architecture"
    if best is not None:
        kl_text += (f"{'; against the others' if same else ''}: {number(searched['kl'])}, the best "
                    f"{'other ' if same else ''}baseline {best['method']} {number(best['kl'])}")
    means = [(retrieval_mean(b, contexts), b["method"]) for b in baselines]
    means = [m for m in means if m[0] is not None]
    mine = retrieval_mean(searched, contexts)
    if mine is None or not means:
        retrieval_text = "not scored"
    else:
        top, who = max(means, key=lambda m: m[0])
        retrieval_text = f"{'yes' if mine >= top else 'no'}: {percent(mine)}, the best baseline {who} {percent(top)}"
    return kl_text, retrieval_text


def budget_section(budget, folder, commands):
    evaluation = json.loads((folder / "eval.json").read_text())
    arch = json.loads((folder / "arch.json").read_text())
    contexts = evaluation["retrieval_contexts"]
    methods = evaluation["methods"]
    searched = next(m for m in methods if m["method"] == "dash")
    baselines = [m for m in methods if m["method"] in BASELINES]
    random_rows = [m for m in baselines if m["method"] == "random"]
    compared = []  # the baselines as the table shows them: random as the median of its seeds
    for name in BASELINES:
        if name == "random" and random_rows:
            compared.append(median_row(random_rows, contexts, evaluation))
        compared += [m for m in baselines if m["method"] == name and name != "random"]
    rows = [dict(searched, method="**searched (dash)**"), *compared,
            dict(evaluation["teacher"], method="all softmax (teacher)")]

    heads = (["method", "KV cache", "KL", "ppl"] + [f"passkey {context_label(c)}" for c in contexts]
             + [f"needle {context_label(c)}" for c in contexts] + ["retrieval mean"])
    lines = [f"#### Budget `{evaluation['budget']}`", ""]
    ops = searched["ops"].split()
    counts = ", ".join(f"{ops.count(o)} {o}" for o in evaluation["ops"].split(",") if o in ops)
    lines.append(f"Searched: {counts} (KV cache {kv_fraction(searched, evaluation):.3f} of all softmax); "
                 f"layers `{''.join(op_letter(o) for o in ops)}`.")
    lines += ["", "| " + " | ".join(heads) + " |", "|" + "---|" + "---:|" * (len(heads) - 1)]
    for r in rows:
        cells = [r["method"], f"{kv_fraction(r, evaluation):.3f}", number(r["kl"]),
                 f"{r['ppl']:.{2 if r['ppl'] < 10 else 1}f}"]
        cells += [percent(v) for v in retrieval_cells(r, contexts)] + [percent(retrieval_mean(r, contexts))]
        lines.append("| " + " | ".join(cells) + " |")
    search = arch["search"]
    search_wall, eval_wall = wall(commands, "search", budget), wall(commands, "eval", budget)
    where = f" on {search['device']}" if "device" in search else ""
    lines += ["", f"Search{where}: {search['tokens']:,} tokens, {seconds(search['seconds'])} of steps"
              + (f" ({seconds(search_wall)} wall with loading)" if search_wall is not None else "")
              + f". Evaluation: {seconds(evaluation['seconds'])}"
              + (f" ({seconds(eval_wall)} wall)" if eval_wall is not None else "") + "."]
    kl_text, retrieval_text = verdicts(searched, compared, contexts)
    lines += ["", f"Searched KL below every baseline's (random: the median of its seeds): {kl_text}. Searched mean "
              f"retrieval ≥ the best baseline's: {retrieval_text}.", ""]
    points = [(m["method"], kv_fraction(m, evaluation), m["kl"]) for m in methods]
    return "\n".join(lines), points, evaluation, arch


def figure_svg(title, points_by_budget):
    """Held-out KL (log axis) against KV-cache fraction: one marker per method, the searched ones joined."""
    W, H = 760, 470
    left, right, top, bottom = 78, 200, 44, 62
    pw, ph = W - left - right, H - top - bottom
    every = [(b, name, x, y) for b, points in points_by_budget for name, x, y in points]
    positive = [y for *_, y in every if y > 0]
    lo = math.floor(math.log10(min(positive))) if positive else -3
    hi = math.ceil(math.log10(max(positive))) if positive else 0
    hi = max(hi, lo + 1)
    xmax = max([x for _, _, x, _ in every] + [0.1])
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5) if xmax / s <= 8)
    xmax = math.ceil(xmax / step - 1e-9) * step

    def px(x):
        return left + pw * x / xmax

    def py(y):
        y = max(y, 10.0 ** lo)
        return top + ph * (hi - math.log10(y)) / (hi - lo)

    styles = {  # method: (marker, fill, stroke, size)
        "dash": ("star", "#d62728", "#7f0000", 9),
        "kl-guided": ("diamond", "#1f77b4", "#1f77b4", 6),
        "even": ("circle", "none", "#2ca02c", 5),
        "first-K": ("square", "none", "#9467bd", 5),
        "last-K": ("triangle", "none", "#ff7f0e", 6),
        "random": ("cross", "none", "#7f7f7f", 4),
    }
    labels = {"dash": "searched (dash)", "kl-guided": "KL-guided", "even": "evenly spaced", "first-K": "first K",
              "last-K": "last K", "random": "random (each seed)"}

    def marker(kind, x, y, fill, stroke, r):
        width = 'stroke-width="1.6"'
        if kind == "circle":
            return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}" stroke="{stroke}" {width}/>'
        if kind == "square":
            return (f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{fill}" '
                    f'stroke="{stroke}" {width}/>')
        if kind == "cross":
            return (f'<path d="M{x - r:.1f},{y - r:.1f}L{x + r:.1f},{y + r:.1f}M{x - r:.1f},{y + r:.1f}'
                    f'L{x + r:.1f},{y - r:.1f}" stroke="{stroke}" {width}/>')
        if kind == "star":
            corners = [(x + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                        y - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        elif kind == "diamond":
            corners = [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
        else:  # triangle
            corners = [(x, y - r), (x + r * 0.9, y + r * 0.6), (x - r * 0.9, y + r * 0.6)]
        d = "M" + "L".join(f"{cx:.1f},{cy:.1f}" for cx, cy in corners) + "Z"
        return f'<path d="{d}" fill="{fill}" stroke="{stroke}" {width}/>'

    font = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {font} '
           f'font-size="13">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="24" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    for e in range(lo, hi + 1):  # decades labelled, 2 and 5 as ticks
        y = py(10.0 ** e)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#dddddd"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{10.0 ** e:g}</text>')
        for m in (2, 5):
            if e < hi:
                ym = py(m * 10.0 ** e)
                out.append(f'<line x1="{left - 4}" y1="{ym:.1f}" x2="{left}" y2="{ym:.1f}" stroke="#444"/>')
    k = 0
    while k * step <= xmax + 1e-9:
        x = px(k * step)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eeeeee"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{k * step:g}</text>')
        k += 1
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{H - 18}" text-anchor="middle">KV cache and recurrent state '
               f'(fraction of the all-softmax model)</text>')
    out.append(f'<text transform="translate(20,{top + ph / 2:.0f}) rotate(-90)" text-anchor="middle">held-out '
               f'KL(teacher ‖ hybrid), nats/token (log)</text>')
    searched = sorted((x, y, b) for b, name, x, y in every if name == "dash")
    if len(searched) > 1:
        d = "M" + "L".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in searched)
        out.append(f'<path d="{d}" fill="none" stroke="#d62728" stroke-width="1.2" stroke-dasharray="4 3"/>')
    for name in ("random", "even", "first-K", "last-K", "kl-guided", "dash"):  # the searched ones on top
        kind, fill, stroke, r = styles[name]
        for b, n, x, y in every:
            if n == name:
                out.append(marker(kind, px(x), py(y), fill, stroke, r))
    # One label per searched point (budgets that chose the same point share it), at the first of a
    # few offsets where it stays inside the plot, covers no star or earlier label, and is nearer its
    # own star than any other; failing that, the first free offset with a leader line to its star.
    spots = {}
    for x, y, b in searched:
        spots.setdefault((round(px(x)), round(py(y))), []).append(b)
    stars = [(x - 9, y - 9, x + 9, y + 9) for x, y in spots]
    placed = list(stars)

    def gap(box, x, y):
        return math.hypot(max(box[0] - x, 0, x - box[2]), max(box[1] - y, 0, y - box[3]))

    for (x, y), budgets in spots.items():
        label = ", ".join(budgets)
        w = round(6.8 * len(label))
        free = []
        for dx, dy in ((11, -8), (11, 16), (-11 - w, -8), (-11 - w, 16), (-w // 2, -14), (-w // 2, 26),
                       (11, -26), (11, 34), (-11 - w, -26), (-11 - w, 34)):
            box = (x + dx, y + dy - 11, x + dx + w, y + dy + 3)
            inside = left <= box[0] and box[2] <= left + pw and top <= box[1] and box[3] <= top + ph
            if inside and all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3] for p in placed):
                free.append((box, dy))
        own = [(box, dy) for box, dy in free
               if all(gap(box, x, y) + 4 < gap(box, (s[0] + s[2]) / 2, (s[1] + s[3]) / 2)
                      for s in stars if s != (x - 9, y - 9, x + 9, y + 9))]
        box, dy = (own or free or [((x + 11, y - 19, x + 11 + w, y - 5), -8)])[0]
        placed.append(box)
        if not own:
            ex, ey = min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3])
            out.append(f'<line x1="{x}" y1="{y}" x2="{ex}" y2="{ey}" stroke="#7f0000" stroke-width="0.8"/>')
        out.append(f'<rect x="{box[0] - 2}" y="{box[1]}" width="{w + 4}" height="15" fill="white" '
                   f'fill-opacity="0.8"/>')
        out.append(f'<text x="{box[0]}" y="{y + dy}" font-size="12" fill="#7f0000">{html.escape(label)}</text>')
    lx, ly = left + pw + 18, top + 8
    for k, name in enumerate(("dash", "kl-guided", "even", "first-K", "last-K", "random")):
        kind, fill, stroke, r = styles[name]
        out.append(marker(kind, lx + 8, ly + 22 * k, fill, stroke, r))
        out.append(f'<text x="{lx + 22}" y="{ly + 22 * k + 4}">{labels[name]}</text>')
    note = ["Each budget's searched", "architecture is labelled", "with its budget. The", "teacher (KL 0, KV 1) is",
            "off the log axis."]
    for k, line in enumerate(note):
        out.append(f'<text x="{lx}" y="{ly + 22 * 6 + 16 * k + 8}" font-size="11" fill="#555">{line}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render(a):
    out = Path(a.out)
    state = json.loads((out / "run.json").read_text())
    readme, figure = Path(a.readme), Path(a.figure)
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: expected one '{BEGIN}' line followed by one '{END}' line")
    figure_link = os.path.relpath(figure, readme.parent)

    sections, points_by_budget, first_eval = [], [], None
    missing = []
    for budget in state["budgets"]:
        folder = out / budget_folder(budget)
        if not (folder / "eval.json").exists():
            missing.append(budget)
            continue
        section, points, evaluation, arch = budget_section(budget, folder, state["commands"])
        sections.append(section)
        points_by_budget.append((evaluation["budget"], points))
        first_eval = first_eval or (evaluation, arch)
    if first_eval is None:
        raise SystemExit(f"{out}: no budget has an eval.json yet")
    evaluation, arch = first_eval
    figure.parent.mkdir(parents=True, exist_ok=True)
    figure.write_text(figure_svg(f"{evaluation['model']}: held-out KL to the teacher against KV cache",
                                 points_by_budget))

    s = state["settings"]
    invocations = state["invocations"]
    dates = sorted({i["started"][:10] for i in invocations} | {i.get("finished", i["started"])[:10]
                                                                 for i in invocations})
    commits = list(dict.fromkeys(i["commit"] for i in invocations if i["commit"]))
    hosts = list(dict.fromkeys(f"{', '.join(i['host']['gpus'])} with {i['host']['cpu']}" if i["host"]["gpus"]
                               else i["host"]["cpu"] for i in invocations))
    prepare = arch.get("prepare")
    prepare_wall = wall(state["commands"], "prepare")
    random_seeds = sum(m["method"] == "random" for m in evaluation["methods"])
    head = [BEGIN, "",
            f"<!-- Written by scripts/search_results.py render from {out}; edit the script, not this text. -->", "",
            f"### Search results: {evaluation['model']}, ops {evaluation['ops'].replace(',', ', ')}", "",
            f"Run {' to '.join([dates[0], dates[-1]] if len(dates) > 1 else dates)} on {' and '.join(hosts)} "
            f"(`--device {s['device']}`), commit {', '.join(c[:12] for c in commits) or 'unknown'}:", "",
            "```sh", invocations[0]["command"], "```", "",
            f"Held-out text: {evaluation['held_out']}; {evaluation['held_out_tokens']:,} tokens scored per "
            f"architecture; calibration (preparation, search, KL-guided selection) never reads it. KV cache: "
            f"bytes of KV cache and recurrent state at context {arch['cost']['context']}, as a fraction of the "
            f"all-softmax model's. Retrieval: exact match of greedy answers, "
            f"{evaluation['retrieval_prompts_per_context']} prompts per task and context; the needle task asks for "
            f"one of 4 keys. Random: the median of {random_seeds} seeds, each column on its own. Layers: "
            f"S softmax, W sliding window, G gated linear, D gated DeltaNet.", ""]
    if prepare:
        head.append(f"Preparation (once, shared by every budget): {prepare['tokens']:,} tokens, "
                    f"{seconds(prepare['seconds'])} of steps"
                    + (f" ({seconds(prepare_wall)} wall with loading)" if prepare_wall is not None else "") + ".")
    else:
        head.append("Preparation: none (no candidate with weights of its own).")
    head += ["", f"![held-out KL against KV cache for every method and budget]({figure_link})", ""]
    if missing:
        head += [f"Not run yet: {', '.join(missing)}.", ""]
    block = "\n".join(head + sections + [END])
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(before + block + after)
    print(f"{readme}: {len(sections)} budget(s); figure {figure}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="mode", required=True)
    r = commands.add_parser("run", help="prepare once, then search and eval per budget (resumable)")
    r.add_argument("--dash", required=True, help="the dash tool binary")
    r.add_argument("--model", required=True)
    r.add_argument("--tokenizer")
    r.add_argument("--data", help="calibration text; its last tenth of documents is held out")
    r.add_argument("--eval-data", help="held-out text instead of the tenth of --data")
    r.add_argument("--ops", default="softmax,swa:512,gla,gdn")
    r.add_argument("--budgets", nargs="+", required=True, help="e.g. softmax-layers=4 kv=0.25")
    r.add_argument("--device", default="cpu")
    r.add_argument("--tokens", type=int, default=16384, help="search tokens")
    r.add_argument("--prepare-tokens", type=int)
    r.add_argument("--eval-tokens", type=int)
    r.add_argument("--seq-len", type=int)
    r.add_argument("--batch", type=int)
    r.add_argument("--context", type=int, help="context at which costs are counted (default: the model's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--retrieval-contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    r.add_argument("--retrieval-prompts", type=int)
    r.add_argument("--random-baselines", type=int)
    r.add_argument("--relaxation", help="softmax, gumbel or straight-through (the tool's default: softmax)")
    r.add_argument("--lr", type=float, help="Adam's step on the architecture logits")
    r.add_argument("--prepare-lr", type=float, help="Adam's peak step in candidate preparation")
    r.add_argument("--copy-fraction", type=float,
                   help="share of calibration sequences whose second half repeats the first (search and KL-guided)")
    r.add_argument("--commit", help="the commit being run, where the checkout has no git metadata")
    r.add_argument("--out", required=True, help="results folder, e.g. runs/search-results/smollm2")
    g = commands.add_parser("render", help="README section and figure from a run's folder")
    g.add_argument("--out", required=True, help="the folder given to run")
    g.add_argument("--readme", default=str(REPO / "README.md"))
    g.add_argument("--figure", default=str(REPO / "docs" / "search_results.svg"),
                   help="the SVG; under docs/ because runs/ is not kept in the repository")
    a = parser.parse_args()
    run(a) if a.mode == "run" else render(a)


if __name__ == "__main__":
    main()
