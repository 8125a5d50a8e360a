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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


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


def markdown(rows: List[Dict], env: Dict[str, object], title: str) -> str:
    head = [f"# {title}", "", "| " + " | ".join(f"{k}: {v}" for k, v in env.items()) + " |", "",
            "| op | case | impl | fwd ms | bwd ms | fwd+bwd ms (IQR) | x eager | GB/s | peak MiB | check |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        both = "-" if r["fwdbwd_ms"] is None else f"{r['fwdbwd_ms']:.2f} ({r['fwdbwd_iqr_ms']:.2f})"
        check = r["match"] if not r["error"] else f"error: {r['error']}"
        head.append(
            f"| {r['op']} | {r['case']} | {r['impl']} | {_fmt(r['fwd_ms'])} | {_fmt(r['bwd_ms'])} | {both} | "
            f"{_fmt(r['speedup_vs_eager'], 1)} | {_fmt(r['gbps'], 1)} | {_fmt(r['peak_mib'], 1)} | {check} |"
        )
    head.append("")
    head.append("fwd+bwd: median wall time of forward + backward of the result (inputs that require grad); "
                "x eager: fwd+bwd of the case's eager baseline (its second row) / this fwd+bwd; GB/s: the op's minimal bytes (read inputs, write "
                "gradients) / kdops fwd+bwd time; check: results and gradients against kdops.")
    return "\n".join(head) + "\n"


def write_json(path: str, rows: List[Dict], env: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)


def plot(path: str, rows: List[Dict], env: Dict[str, object], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(cases) + 2), 4.5))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, c in enumerate(cases):
            r = next((r for r in rows if (r["op"], r["case"]) == c and r["impl"] == impl), None)
            if r and r["fwdbwd_ms"]:
                xs.append(i + j * width)
                ys.append(r["fwdbwd_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{op}\n{case[:38]}" for op, case in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    ax.set_title(f"{title}\n{env['device']} · torch {env['torch']} · {env['date']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
