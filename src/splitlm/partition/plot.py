"""The Pareto plot of a search: predicted per-token latency against perplexity (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from splitlm.errors import ConfigError
from splitlm.partition.search import SearchResult, describe


def front_2d(cands: list) -> list:
    """The candidates no other beats on both predicted latency and perplexity, by latency."""
    out = []
    for c in sorted(cands, key=lambda c: (c.token_latency_ms, c.perplexity)):
        if not out or c.perplexity < out[-1].perplexity:
            out.append(c)
    return out


def pareto_plot(result: SearchResult, num_layers: int, path: str | Path, title: str = "", budgets=None) -> None:
    """Every feasible configuration (grey), the Pareto set over latency, perplexity and bytes per token (coloured by
    split point), the front over latency and perplexity alone (a step line), the budgets and the chosen plan."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'splitlm[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if result.candidates:
        ax.scatter([c.token_latency_ms for c in result.candidates], [c.perplexity for c in result.candidates],
                   s=6, c="0.8", label="feasible")
    pareto = sorted(result.pareto, key=lambda c: c.token_latency_ms)
    points = ax.scatter([c.token_latency_ms for c in pareto], [c.perplexity for c in pareto],
                        c=[c.split for c in pareto], cmap="viridis", vmin=0, vmax=num_layers, s=28,
                        label="Pareto set (latency, perplexity, bytes/token)")
    fig.colorbar(points, ax=ax, label="split point ℓ")
    front = front_2d(result.candidates or result.pareto)
    if front:
        ax.step([c.token_latency_ms for c in front], [c.perplexity for c in front], where="post", c="C1", lw=1,
                label="front (latency, perplexity)")
    if budgets is not None:
        ax.axvline(budgets.token_latency_ms, c="C3", ls="--", lw=1, label=f"latency budget {budgets.token_latency_ms:g} ms")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.token_latency_ms], [c.perplexity], marker="*", s=220, c="red", label="chosen")
        ax.annotate(describe(c, num_layers), (c.token_latency_ms, c.perplexity), xytext=(8, 8),
                    textcoords="offset points", fontsize=7)
    ax.set_xlabel("predicted per-token latency (ms)")
    ax.set_ylabel("predicted perplexity")
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    memory = f"; plans within {budgets.device_memory_bytes / 2**20:.0f} MiB of device memory" if budgets is not None else ""
    ax.set_title((title or "splitlm partition: feasible plans") + memory, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
