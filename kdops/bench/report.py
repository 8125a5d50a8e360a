"""Tables (markdown), JSON and PNG plots of bench rows, with the environment they ran in."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
from typing import Dict, List

import torch


def environment(device: torch.device) -> Dict[str, object]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _timing(r: Dict, key: str) -> str:
    med, iqr = r.get(f"{key}_ms"), r.get(f"{key}_iqr_ms")
    if med is None:
        return "-"
    return f"{med:.2f}" if iqr is None else f"{med:.2f} ({iqr:.2f})"


def disturbed_rows(rows: List[Dict]) -> List[Dict]:
    """Rows whose timings look disturbed (recomputed for JSON written before the flag existed)."""
    from .harness import disturbance

    return [r for r in rows if not r.get("error") and (r.get("disturbed") or disturbance(r))]


def summary(rows: List[Dict]) -> str:
    """One line: how many timed rows look disturbed, and what to do about it."""
    from .harness import ADVICE, CANARY_SPREAD, CONSISTENCY, SPREAD

    timed = [r for r in rows if r.get("fwdbwd_ms") is not None]
    bad = disturbed_rows(timed)
    if not bad:
        canary = all((r.get("extra") or {}).get("canary_spread") is not None for r in timed)
        noise = (f"the canary's spread within {CANARY_SPREAD:.0%} during every case" if canary else
                 f"every spread (IQR) within {SPREAD:.0%} of its median")
        return f"timings consistent: {noise} and every fwd+bwd >= {CONSISTENCY:g} x max(fwd, bwd) ({len(timed)} rows)"
    cases = list(dict.fromkeys(f"{r['op']} ({r['case']})" for r in bad))
    return (f"WARNING: {len(bad)} of {len(timed)} timings look disturbed by other work on this machine "
            f"(marked ! in the table; {len(cases)} case(s), e.g. {cases[0]}): {ADVICE}")


def markdown(rows: List[Dict], env: Dict[str, object], title: str) -> str:
    head = [f"# {title}", "", "| " + " | ".join(f"{k}: {v}" for k, v in env.items()) + " |", "",
            "| op | case | impl | fwd ms (IQR) | bwd ms (IQR) | fwd+bwd ms (IQR) | x eager | x compile | x roof | GB/s "
            "| peak MiB | check | timing |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    from .harness import disturbance

    for r in rows:
        check = r["match"] if not r["error"] else f"error: {r['error']}"
        why = "" if r.get("error") else (r.get("disturbed") or disturbance(r))
        mark = "!" if why else ""
        head.append(
            f"| {r['op']} | {r['case']} | {r['impl']} | {_timing(r, 'fwd')} | {_timing(r, 'bwd')} | "
            f"{_timing(r, 'fwdbwd')}{mark} | {_fmt(r['speedup_vs_eager'], 1)}{mark} | "
            f"{_fmt(r.get('vs_compile'), 1)} | {_fmt(r.get('vs_roof'), 2)} | {_fmt(r['gbps'], 1)} | "
            f"{_fmt(r['peak_mib'], 1)} | {check} | {('! disturbed: ' + why) if why else 'ok'} |"
        )
    head.append("")
    head.append("fwd, bwd: median wall time of the forward pass and of the backward pass of the result (inputs "
                "that require grad), timed separately; fwd+bwd: both timed in one go; IQR: the interquartile "
                "range of the repetitions, which are interleaved across implementations; x eager: fwd+bwd of the "
                "case's eager baseline (its second row) / this fwd+bwd; x compile: the case's torch.compile "
                "fwd+bwd / this fwd+bwd; x roof: this fwd+bwd / the case's roof (the machine's own limit for the "
                "problem, timed in the same run: see the bounds below; 1 = at the limit); GB/s: the op's minimal bytes (read "
                "inputs, write gradients) / kdops fwd+bwd time; check: results and gradients against kdops; "
                "timing: `!` where other work disturbed the machine -- a fixed elementwise pass timed after every "
                "repetition round (the canary) varied, or fwd+bwd came out below max(fwd, bwd).")
    bounds = {}
    for r in rows:
        b = (r.get("extra") or {}).get("bound")
        if b:
            bounds.setdefault(b, []).append(r["op"])
    if bounds:
        head.append("")
        head.append("Roofs (the `roof` rows; no backward of their own: their fwd+bwd is one pass of the least work):")
        head.append("")
        for b, ops in bounds.items():
            head.append(f"- {', '.join(dict.fromkeys(ops))}: {b}.")
    head.append("")
    head.append(summary(rows))
    return "\n".join(head) + "\n"


def write_json(path: str, rows: List[Dict], env: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)


#: op -> family: one chart panel each (ops that serve one kind of distillation term side by side)
FAMILIES = {
    "masked_mse": "feature losses", "pcc_mse": "feature losses",
    "box_ranges": "box ops", "box_pool": "box ops", "box_paint": "box ops", "box_masks": "box ops",
    "mask_pool": "box ops", "nms_mask": "box ops",
    "gather_level_features": "gather",
    "ms_deform_attn": "deformable attention",
    "bckd_cls_loss": "BCKD dense-head losses", "bckd_loc_loss": "BCKD dense-head losses",
}
KDOPS_COLOUR = "#1f77b4"    # kdops: always this blue, and no other implementation gets it
ROOF_COLOUR = "#000000"     # the roof (the machine's limit for the case): black
EAGER_COLOUR = "#7f7f7f"    # the eager baseline of each case (1x): grey
COMPILE_COLOUR = "#ff7f0e"  # torch.compile(reference)
PEER_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728", "#393b79"]


def family(op: str) -> str:
    return FAMILIES.get(op, op)


def colours(rows: List[Dict]) -> Dict[str, str]:
    """One distinct colour per implementation name across the whole chart: kdops blue, each case's
    eager baseline grey, torch.compile orange, every other implementation (peers, variants) its own."""
    baselines = set()
    by_case: Dict[tuple, List[str]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["case"]), []).append(r["impl"])
    for impls in by_case.values():
        if len(impls) > 1:
            baselines.add(impls[1])
    out: Dict[str, str] = {}
    peers = iter(PEER_COLOURS * 4)
    for r in rows:
        name = r["impl"]
        if name in out:
            continue
        if name == "kdops":
            out[name] = KDOPS_COLOUR
        elif r.get("match") == "roof":
            out[name] = ROOF_COLOUR
        elif name in baselines:
            out[name] = EAGER_COLOUR
        elif name == "compile":
            out[name] = COMPILE_COLOUR
        else:
            out[name] = next(peers)
    return out


def _times(v: float) -> str:
    return f"{v:,.0f}x" if v >= 1000 else f"{v:.3g}x"


def plot(path: str, rows: List[Dict], env: Dict[str, object], title: str) -> None:
    """One horizontal bar chart per op family: forward+backward speed-up over each case's eager
    baseline (log scale, 1x marked), one bar per implementation in its own colour, case labels on
    the left, legend outside the bars on the right; hatched bars and `!` mark disturbed timings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .harness import disturbance

    rows = [r for r in rows if r.get("speedup_vs_eager")]
    order = list(dict.fromkeys(FAMILIES.values()))
    fams = sorted(dict.fromkeys(family(r["op"]) for r in rows),
                  key=lambda f: (order.index(f) if f in order else len(order), f))
    if not fams:
        raise ValueError("kdops plot: no timed rows with a speed-up to draw")
    cmap = colours(rows)
    panels = []
    for fam in fams:
        frows = [r for r in rows if family(r["op"]) == fam]
        cases = list(dict.fromkeys((r["op"], r["case"]) for r in frows))
        panels.append((fam, frows, cases))
    heights = [0.22 * len(fr) + 0.25 * len(cs) + 0.7 for _, fr, cs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    label_x = FuncFormatter(lambda v, _: f"{v:g}x")
    for ax, (fam, frows, cases) in zip(axes[:, 0], panels):
        y, yticks, ylabels = 0.0, [], []
        any_bad, legend = False, {}
        for op, case in cases:
            crows = [r for r in frows if (r["op"], r["case"]) == (op, case)]
            top = y
            for i, r in enumerate(crows):
                bad = bool(r.get("disturbed") or disturbance(r))
                any_bad |= bad
                colour = cmap[r["impl"]]
                ax.barh(y, r["speedup_vs_eager"], height=0.8, color=colour, hatch="///" if bad else None,
                        edgecolor="black" if bad else colour, linewidth=0.4)
                # every case's eager baseline is grey: one legend entry for all of them
                legend.setdefault("eager baseline (1x)" if colour == EAGER_COLOUR else r["impl"], colour)
                ax.text(r["speedup_vs_eager"] * 1.04, y, f"{_times(r['speedup_vs_eager'])}{' !' if bad else ''}",
                        va="center", fontsize=7)
                y += 1
            yticks.append((top + y - 1) / 2)
            label = case if len(case) <= 48 else case[:46] + "…"
            ylabels.append(f"{op}\n{label}")
            y += 0.7
        ax.set_yticks(yticks)
        ax.set_yticklabels(ylabels, fontsize=7.5)
        ax.set_ylim(y - 0.5, -0.7)
        ax.set_xscale("log")
        lo = min(r["speedup_vs_eager"] for r in frows)
        hi = max(r["speedup_vs_eager"] for r in frows)
        ax.set_xlim(min(lo, 1.0) / 1.6, max(hi, 1.0) * 2.2)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(label_x)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7.5)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="x", which="major", linewidth=0.3, alpha=0.6)
        ax.set_title(fam, fontsize=9, loc="left", fontweight="bold")
        handles = [Patch(facecolor=c, edgecolor=c, label=n) for n, c in legend.items()]
        if any_bad:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="! disturbed timing"))
        ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("forward + backward speed-up over the eager baseline (log scale; 1x = eager)", fontsize=8)
    fig.suptitle(f"{title}\n{env.get('device', '?')} · torch {env.get('torch', '?')} · {env.get('date', '?')}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (sum(heights) + 1.2)))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roof(path: str, rows: List[Dict], env: Dict[str, object], title: str) -> None:
    """Each case against the machine's own limit: forward+backward time of every implementation as a
    multiple of the case's roof time (log scale; 1x = the roof, the dashed line at 2x = issue 20's
    target for memory-bound ops), one colour per implementation as in :func:`plot`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in rows if r.get("vs_roof") and r.get("match") != "roof"]
    if not rows:
        raise ValueError("kdops plot: no rows with a roof ratio to draw")
    cmap = colours(rows)
    cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
    height = 0.22 * len(rows) + 0.25 * len(cases) + 1.2
    fig, ax = plt.subplots(figsize=(11, height + 1.0))
    y, yticks, ylabels, legend = 0.0, [], [], {}
    for op, case in cases:
        top = y
        for r in [r for r in rows if (r["op"], r["case"]) == (op, case)]:
            colour = cmap[r["impl"]]
            ax.barh(y, r["vs_roof"], height=0.8, color=colour)
            legend.setdefault("eager baseline" if colour == EAGER_COLOUR else r["impl"], colour)
            ax.text(r["vs_roof"] * 1.04, y, _times(r["vs_roof"]), va="center", fontsize=7)
            y += 1
        yticks.append((top + y - 1) / 2)
        ylabels.append(f"{op}\n{case if len(case) <= 48 else case[:46] + '…'}")
        y += 0.7
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=7.5)
    ax.set_ylim(y - 0.5, -0.7)
    ax.set_xscale("log")
    ax.set_xlim(0.8, max(r["vs_roof"] for r in rows) * 2.2)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(2.0, color="black", linewidth=0.8, linestyle="--")
    ax.grid(axis="x", which="major", linewidth=0.3, alpha=0.6)
    handles = [Patch(facecolor=c, edgecolor=c, label=n) for n, c in legend.items()]
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel("forward + backward time / the roof's time (log scale; 1x = the machine's limit, dashed: 2x)",
                  fontsize=8)
    fig.suptitle(f"{title}: time against the roof\n{env.get('device', '?')} · torch {env.get('torch', '?')} · "
                 f"{env.get('date', '?')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / (height + 1.0)))  # room for the two-line title
    fig.savefig(path, dpi=100)
    plt.close(fig)
