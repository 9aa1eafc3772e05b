"""PNG charts from the JSON results (so a chart can be redrawn from a saved file).

matplotlib is imported inside the functions with the Agg backend: no display needed, and
`zeroserve bench` without --plot does not pay for the import.
"""

from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def token_times(result: dict) -> list[tuple[float, float]]:
    """(seconds since the benchmark start, tokens) for every text chunk of every successful
    request; a chunk carries output_tokens / chunks tokens of its request."""
    points = []
    for r in result["per_request"]:
        if not r["success"]:
            continue
        t = r["start_s"] + r["ttft_ms"] / 1000.0
        chunks = [t]
        for gap in r["itl_ms"]:
            t += gap / 1000.0
            chunks.append(t)
        per_chunk = r["output_tokens"] / len(chunks)
        points += [(c, per_chunk) for c in chunks]
    return points


def plot_serve(result: dict, path: str) -> None:
    """Four panels: TTFT and E2EL per request over time, ITL histogram, latency CDFs, and
    output tokens/s over the run."""
    plt = _pyplot()
    ok = [r for r in result["per_request"] if r["success"]]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    title = f"{result['model']} @ {result['base_url']}  ({result['completed']} ok, {result['failed']} failed)"
    fig.suptitle(title, fontsize=11)

    ax = axes[0][0]
    ax.scatter([r["start_s"] for r in ok], [r["e2el_ms"] for r in ok], s=8, label="E2EL")
    ax.scatter([r["start_s"] for r in ok], [r["ttft_ms"] for r in ok], s=8, label="TTFT")
    ax.set(xlabel="request sent at (s)", ylabel="ms", title="Latency per request")
    ax.legend()

    ax = axes[0][1]
    itl = [g for r in ok for g in r["itl_ms"]]
    if itl:
        ax.hist(itl, bins=50)
        for key, style in (("median_itl_ms", "--"), ("p99_itl_ms", ":")):
            if result.get(key) is not None:
                ax.axvline(
                    result[key], color="k", linestyle=style, label=f"{key.split('_')[0]} {result[key]:.1f} ms"
                )
        ax.legend()
    ax.set(xlabel="ms", ylabel="chunks", title="Inter-token latency")

    ax = axes[1][0]
    for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
        xs = sorted(r[key] for r in ok if r[key] is not None)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=key[:-3].upper())
    ax.set(xlabel="ms", ylabel="fraction of requests", title="Latency CDF")
    ax.set_xscale("symlog")
    ax.legend()

    ax = axes[1][1]
    points = token_times(result)
    if points:
        span = max(t for t, _ in points) or 1.0
        nbins = 30
        width = span / nbins
        bins = [0.0] * nbins
        for t, n in points:
            bins[min(int(t / width), nbins - 1)] += n
        ax.plot([(i + 0.5) * width for i in range(nbins)], [b / width for b in bins])
    ax.set(xlabel="s since start", ylabel="tokens/s", title="Output throughput")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(sweep: dict, path: str) -> None:
    """Three panels against concurrency, one line per target: output tokens/s, p99 TTFT,
    p99 ITL."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("output_throughput", "output tokens/s", "Throughput"),
        ("p99_ttft_ms", "ms", "p99 TTFT"),
        ("p99_itl_ms", "ms", "p99 ITL"),
    )
    for ax, (key, unit, title) in zip(axes, panels):
        for target in sweep["targets"]:
            runs = [r for r in target["runs"] if r.get(key) is not None]
            if runs:
                ax.plot(
                    [r["concurrency"] for r in runs], [r[key] for r in runs], marker="o", label=target["name"]
                )
        ax.set(xlabel="max concurrency", ylabel=unit, title=title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep["concurrency"], [str(c) for c in sweep["concurrency"]])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
