"""Tables and plots from ``results.json``, and the benchmarks page of the docs.

    python -m benchmarks.report            # rewrites results.md, the plots and docs/benchmarks.md
                                           # from every benchmarks/results/*/results.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os

__all__ = ["write_markdown", "write_plots", "write_doc", "markdown_tables"]

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ("torch_eager", "torch_compile")
MiB = 2 ** 20


# --- number formats ------------------------------------------------------------------------

def _time(stats: dict | None) -> str:
    """``12.3 ms (11.9–12.8)``: median and quartiles."""
    if not stats:
        return "—"
    scale, unit = (1e3, "ms") if stats["median"] < 1 else (1.0, "s")
    return f"{stats['median'] * scale:.3g} {unit} ({stats['q25'] * scale:.3g}–{stats['q75'] * scale:.3g})"


def _ratio(stats: dict | None) -> str:
    """``0.95 [0.93–0.97]``: median of per-round ratios and quartiles."""
    if not stats:
        return "—"
    return f"{stats['median']:.2f} [{stats['q25']:.2f}–{stats['q75']:.2f}]"


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _size(n) -> str:
    """Bytes in the largest unit that keeps the number >= 1: ``12.3 MiB``."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", MiB), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _peer(step: dict, name: str) -> dict:
    return step["backends"].get(name, {})


# --- markdown ------------------------------------------------------------------------------

def header_lines(results: dict) -> list[str]:
    d, v = results["device"], results["versions"]
    device = (f"{d['cpu']['model']}, {d['cpu']['cores']} cores @ {d['cpu']['clock_mhz']} MHz"
              if d["platform"] == "cpu" else d["device_kind"])
    lib = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "optax", "torch") if v.get(k))
    threads = results["plan"].get("threads")
    config = results["steps"][0]["config"] if results["steps"] else {}
    variant = {k: config[k] for k in ("backward", "attn_block_size", "loss_chunk") if k in config}
    return [f"- Date: {results['date']}; device: {device} ({d['platform']}); dtype "
            f"{results['plan']['dtype']}" + (f"; {threads} thread(s)" if threads else ""),
            f"- Manual variant: {', '.join(f'{k}={v}' for k, v in variant.items()) or 'default'}; "
            f"config overrides: {results['plan'].get('overrides') or 'none'}; manual_grad sources "
            f"sha256 {results.get('manual_grad_source_sha256', '?')[:12]}",
            f"- Versions: {lib}; Python {v['python']}",
            f"- Peak for MFU: {d['peak']['formula']}",
            f"- Command: `{results['command'].strip()}` ({results['wall_s'] / 60:.1f} min"
            + ("" if results.get("complete", True) else ", cut short: partial results") + ")"]


def _steps(results: dict) -> list[dict]:
    """The training-step records ordered by preset (as planned), then T."""
    order = {p: i for i, p in enumerate(dict.fromkeys(s["preset"] for s in results["steps"]))}
    return sorted(results["steps"], key=lambda s: (order[s["preset"]], s["seq_len"]))


def _backend_time(entry: dict) -> str:
    """A contender's step time, or why it has none (out of memory, not run, failed)."""
    if "out_of_memory" in entry:
        return f"out of memory ({entry['out_of_memory']})"
    return _time(entry.get("time_s"))


def step_table(results: dict) -> list[str]:
    rows = ["| preset | B | T | manual / step | autodiff / step | **manual / autodiff time** | "
            "temp manual / autodiff | **temp ratio** | total ratio | torch eager / step | "
            "**manual / torch eager** | torch.compile / step | **manual / torch.compile** | "
            "MFU manual / autodiff / eager |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in _steps(results):
        m, a, r = s["backends"]["manual"], s["backends"]["autodiff"], s["ratios"]
        eager, comp = _peer(s, "torch_eager"), _peer(s, "torch_compile")
        ma = r.get("manual/autodiff", {})
        rows.append(
            f"| {s['preset']} | {s['batch']} | {s['seq_len']} | {_backend_time(m)} | "
            f"{_backend_time(a)} | {_ratio(ma.get('time'))} | "
            f"{_size(m['memory']['temp'])} / {_size(a['memory']['temp'])} | "
            f"{_x(_ratio_of(m['memory']['temp'], a['memory']['temp']))} | "
            f"{_x(_ratio_of(m['memory']['total'], a['memory']['total']))} | "
            f"{_backend_time(eager)} | {_ratio(r.get('manual/torch_eager', {}).get('time'))} | "
            f"{_backend_time(comp)} | {_ratio(r.get('manual/torch_compile', {}).get('time'))} | "
            f"{_pct(m.get('mfu'))} / {_pct(a.get('mfu'))} / {_pct(eager.get('mfu'))} |")
    return rows


def _ratio_of(a, b):
    return a / b if b else None


def forward_backward_table(results: dict) -> list[str]:
    """The forward and backward alone (no optimizer update), manual against the peers."""
    rows = ["| preset | B | T | manual fwd+bwd | torch eager fwd+bwd | **manual / torch eager** | "
            "torch.compile fwd+bwd | **manual / torch.compile** |",
            "|---|---|---|---|---|---|---|---|"]
    for s in _steps(results):
        r = s.get("forward_backward_ratios", {})
        fb = lambda name: _time(_peer(s, name).get("forward_backward_s"))   # noqa: E731
        rows.append(f"| {s['preset']} | {s['batch']} | {s['seq_len']} | {fb('manual')} | "
                    f"{fb('torch_eager')} | {_ratio(r.get('manual/torch_eager', {}).get('time'))} | "
                    f"{fb('torch_compile')} | {_ratio(r.get('manual/torch_compile', {}).get('time'))} |")
    return rows


def layer_table(results: dict) -> list[str]:
    rows = ["| preset | layer | manual fwd+bwd | autodiff fwd+bwd | **manual / autodiff time** | "
            "temp manual / autodiff | **temp ratio** | total ratio | saved for bwd manual / autodiff |",
            "|---|---|---|---|---|---|---|---|---|"]
    for rec in results["layers"]:
        m, a, r = rec["backends"]["manual"], rec["backends"]["autodiff"], rec["manual_over_autodiff"]
        saved = " / ".join(_size(b["residuals"]["intermediate_bytes"]) if b["residuals"].get("available")
                           else "?" for b in (m, a))
        rows.append(f"| {rec['preset']} | {rec['layer']} | {_time(m['time_s'])} | {_time(a['time_s'])} | "
                    f"{_ratio(r['time'])} | {_size(m['memory']['temp'])} / {_size(a['memory']['temp'])} | "
                    f"{_x(r['memory_temp'])} | {_x(r['memory_total'])} | {saved} |")
    return rows


def compile_table(results: dict) -> list[str]:
    rows = ["| preset | T | compile s manual / autodiff | torch.compile first call s | "
            "HLO fusions manual / autodiff | HLO instructions manual / autodiff |",
            "|---|---|---|---|---|---|"]
    for s in _steps(results):
        m, a = s["backends"]["manual"], s["backends"]["autodiff"]
        first = _peer(s, "torch_compile").get("first_call_s")
        rows.append(f"| {s['preset']} | {s['seq_len']} | {m['lower_s'] + m['compile_s']:.1f} / "
                    f"{a['lower_s'] + a['compile_s']:.1f} | {'—' if first is None else f'{first:.1f}'} | "
                    f"{m['hlo']['fusion']} / {a['hlo']['fusion']} | "
                    f"{m['hlo']['instructions']} / {a['hlo']['instructions']} |")
    return rows


def residual_lines(results: dict, top: int = 6) -> list[str]:
    """What each layer's forward saves for its backward, per backend (largest first)."""
    lines = []
    for rec in results["layers"]:
        lines.append(f"- **{rec['layer']}** ({rec['preset']}, {rec['shape']})")
        for backend in ("manual", "autodiff"):
            res = rec["backends"][backend]["residuals"]
            if not res.get("available"):
                continue
            arrays = "; ".join(f"`{a}`" for a in res["arrays"][:top])
            more = f"; … {res['count'] - top} more" if res["count"] > top else ""
            lines.append(f"  - {backend}: {res['count']} arrays, {_size(res['intermediate_bytes'])}: "
                         f"{arrays}{more}")
    return lines


def peer_notes(results: dict) -> list[str]:
    notes = set()
    for s in results["steps"]:
        for name in PEERS:
            for why in ("unavailable", "not_run"):
                if why in _peer(s, name):
                    label = "failed" if why == "unavailable" else "not run"
                    notes.add(f"- {name} on {s['preset']} ({label}): {_peer(s, name)[why]}")
        for name in PEERS:
            diff = _peer(s, name).get("loss_abs_diff_vs_jax")
            if diff is not None and diff > 1e-4:
                notes.add(f"- {name} on {s['preset']} T={s['seq_len']}: loss differs by {diff:.2e}")
    return sorted(notes)


def markdown_tables(results: dict) -> list[str]:
    lines = header_lines(results)
    lines += ["", "### Full training step (value_and_grad + AdamW), per preset and T", "",
              "Times: median (quartiles) over rounds. Ratios: median [quartiles] of per-round ratios "
              "(< 1: manual is faster / smaller). Memory: XLA's `memory_analysis()` of the compiled "
              "step; temp = activations and intermediates, total = temp + arguments + outputs "
              "(parameters, AdamW state and their updates included).", ""]
    lines += step_table(results)
    lines += ["", "### Forward + backward alone (no optimizer), against the PyTorch peers", ""]
    lines += forward_backward_table(results)
    if results["layers"]:
        lines += ["", "### Per layer (forward + backward)", ""] + layer_table(results)
    lines += ["", "### Compile time and program size", ""] + compile_table(results)
    notes = peer_notes(results)
    if notes:
        lines += ["", "### Peers not run or not matching", ""] + notes
    return lines


def write_markdown(results: dict, path: str) -> None:
    title = f"# Benchmark results: {results['device']['device_kind']} ({results['device']['platform']})"
    lines = [title, ""] + markdown_tables(results)
    if results["layers"]:
        lines += ["", "### What each forward saves for the backward", ""] + residual_lines(results)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# --- plots ---------------------------------------------------------------------------------

def write_plots(results: dict, out_dir: str) -> list[str]:
    """``steps.png`` (time and temp memory vs T per preset) and ``layers.png`` (ratios)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    presets = list(dict.fromkeys(s["preset"] for s in results["steps"]))
    if presets:
        fig, axes = plt.subplots(2, len(presets), figsize=(4.5 * len(presets), 7), squeeze=False)
        for col, preset in enumerate(presets):
            steps = [s for s in _steps(results) if s["preset"] == preset]
            T = [s["seq_len"] for s in steps]
            ax = axes[0][col]
            for name, style in (("manual", "o-"), ("autodiff", "s--"), ("torch_eager", "^:"),
                                ("torch_compile", "v-.")):
                points = [(t, s["backends"][name]["time_s"], 1e3 / s["tokens_per_step"])
                          for t, s in zip(T, steps) if "time_s" in s["backends"].get(name, {})]
                if points:      # per 1000 tokens: cells with another batch size stay comparable
                    ax.errorbar([p[0] for p in points], [p[1]["median"] * p[2] for p in points],
                                yerr=[[(p[1]["median"] - p[1]["q25"]) * p[2] for p in points],
                                      [(p[1]["q75"] - p[1]["median"]) * p[2] for p in points]],
                                fmt=style, label=name, capsize=2)
            batches = "/".join(str(b) for b in dict.fromkeys(s["batch"] for s in steps))
            ax.set(xscale="log", yscale="log", title=f"{preset} (B={batches})",
                   xlabel="T", ylabel="training-step seconds per 1000 tokens")
            ax.minorticks_off()
            ax.set_xticks(T, [str(t) for t in T])
            ax.legend(fontsize=8)
            ax = axes[1][col]
            for name, style, color in (("manual", "o-", "C0"), ("autodiff", "s--", "C1")):
                ax.plot(T, [s["backends"][name]["memory"]["temp"] / MiB for s in steps], style,
                        color=color, label=f"{name} temp")
                ax.plot(T, [s["backends"][name]["memory"]["total"] / MiB for s in steps], style,
                        color=color, alpha=0.35, label=f"{name} total")
            ax.set(xscale="log", yscale="log", xlabel="T", ylabel="MiB (XLA memory_analysis)")
            ax.minorticks_off()
            ax.set_xticks(T, [str(t) for t in T])
            ax.legend(fontsize=8)
        fig.suptitle(f"Training step, {results['device']['device_kind']}, {results['plan']['dtype']}, "
                     f"{results['date'][:10]}")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "steps.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if results["layers"]:
        recs = results["layers"]
        labels = [f"{r['preset']}\n{r['layer']}" for r in recs]
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(recs)), 4))
        x = range(len(recs))
        t = [r["manual_over_autodiff"]["time"] for r in recs]
        ax.bar([i - 0.2 for i in x], [s["median"] for s in t], 0.4, label="time",
               yerr=[[s["median"] - s["q25"] for s in t], [s["q75"] - s["median"] for s in t]])
        ax.bar([i + 0.2 for i in x], [r["manual_over_autodiff"]["memory_temp"] or 0 for r in recs], 0.4,
               label="temp memory")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set(ylabel="manual / autodiff", title="Per layer forward + backward: manual / autodiff")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "layers.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# --- the docs page -------------------------------------------------------------------------

INTRO = """# Benchmarks: hand-written vs automatic gradients

`python -m benchmarks.run` (or `make bench`) measures, on the same inputs in the same
process, the hand-written backward (`backend="manual"`) against JAX's autodiff of the
plain-jnp twins (`backend="autodiff"`), per layer and for the whole jitted training step
(`value_and_grad(loss_fn)` + `optax.adamw`), with PyTorch eager autograd and
`torch.compile` on a nanoGPT-style copy of the same network (same weights; its loss
matches ours to 1e-5) as outside peers. `--quick` is a one-minute smoke run; `--device gpu
--dtype bfloat16` the GPU run; `--set field=value` benchmarks any `GPTConfig` variant
without code changes. Results (every figure, with device, versions and config) are in
`benchmarks/results/<device>/results.json`; this page is generated from them by
`python -m benchmarks.report`.

Method: compile excluded and reported apart; one warm-up round excluded;
`block_until_ready` on every call; contenders interleaved in ABBA order so machine drift
cancels in the ratios, a contender whose call is under a second making one untimed call
right before each timed one (so that it is timed as in a training loop, straight after a
call of its own, not cold after another contender's); medians with quartiles. The process
keeps the host memory it frees (`keep_host_memory`, for every contender), so no call pays
for faulting in memory the previous one returned. Training FLOPs per token = 6N + 12·L·T·C
(N without the position table); MFU = FLOPs/token × tokens/s ÷ the stated peak (CPU:
cores × clock × FLOPs/cycle; GPU: the data sheet's dense peak, TF32 for float32).
Dropout is off everywhere (the peers run the same deterministic function). The timed JAX
step donates the parameters and AdamW state, as `manual_grad.training` does, so they are updated
in place like the PyTorch peers' (without donation every step writes 3x the parameters' bytes
to fresh buffers: 0.3 s of a 1.7 s GPT-2 step at B=1, T=128 here); the memory columns come
from the same step compiled without donation, so that `temp` is the activations.
"""


def write_doc(results_paths: list[str], doc_path: str) -> None:
    """docs/benchmarks.md: the tables and plots of every results.json (CPU first), then the
    findings in benchmarks/findings.md."""
    loaded = []
    for path in results_paths:
        with open(path) as f:
            loaded.append((path, json.load(f)))
    # CPU before GPU, each device's default run before its variants (--set ...)
    loaded.sort(key=lambda item: (item[1]["device"]["platform"] != "cpu", bool(item[1]["plan"]["overrides"]),
                                  item[0]))
    lines = [INTRO]
    for path, results in loaded:
        d = results["device"]
        name = (f"CPU: {d['cpu']['model']}, {d['cpu']['cores']} cores" if d["platform"] == "cpu"
                else f"GPU: {d['device_kind']}")
        variant = ", ".join([results["plan"]["dtype"]] + [f"{k}={v}" for k, v in results["plan"]["overrides"].items()])
        lines += [f"## {name} ({variant})", ""]
        lines += markdown_tables(results)
        rel = os.path.relpath(os.path.dirname(path), os.path.dirname(os.path.abspath(doc_path)))
        for png in ("steps.png", "layers.png"):
            if os.path.exists(os.path.join(os.path.dirname(path), png)):
                lines += ["", f"![{png}]({rel}/{png})"]
        lines.append("")
    if not any(r["device"]["platform"] != "cpu" for _, r in loaded):
        lines += ["## GPU", "", "No GPU results are committed yet: run `python -m benchmarks.run "
                  "--device gpu` and `python -m benchmarks.run --device gpu --dtype bfloat16 --tag bf16` "
                  "on a GPU machine, then `python -m benchmarks.report`.", ""]
    findings = os.path.join(HERE, "findings.md")
    if os.path.exists(findings):
        with open(findings) as f:
            lines += [f.read()]
    os.makedirs(os.path.dirname(os.path.abspath(doc_path)), exist_ok=True)
    with open(doc_path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("--results", nargs="*", help="results.json files (default: benchmarks/results/*/)")
    p.add_argument("--doc", default=os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md"))
    args = p.parse_args(argv)
    paths = args.results or sorted(glob.glob(os.path.join(HERE, "results", "*", "results.json")))
    for path in paths:          # tables and plots too, e.g. of a run that was cut short
        with open(path) as f:
            results = json.load(f)
        write_markdown(results, os.path.join(os.path.dirname(path), "results.md"))
        write_plots(results, os.path.dirname(path))
    write_doc(paths, args.doc)
    print(f"wrote {args.doc} from {len(paths)} result file(s)")


if __name__ == "__main__":
    main()
