"""The Pareto plot of a search: predicted per-token latency against perplexity (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from splitlm.errors import ConfigError
from splitlm.partition.search import SearchResult, describe


def pareto_plot(result: SearchResult, num_layers: int, path: str | Path, title: str = "") -> None:
    """Every feasible configuration (grey), the Pareto front (coloured by split point) and the chosen plan."""
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
    front = sorted(result.pareto, key=lambda c: c.token_latency_ms)
    points = ax.scatter([c.token_latency_ms for c in front], [c.perplexity for c in front],
                        c=[c.split for c in front], cmap="viridis", vmin=0, vmax=num_layers, s=28, label="Pareto front")
    fig.colorbar(points, ax=ax, label="split point ℓ")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.token_latency_ms], [c.perplexity], marker="*", s=220, c="red", label="chosen")
        ax.annotate(describe(c, num_layers), (c.token_latency_ms, c.perplexity), xytext=(8, 8),
                    textcoords="offset points", fontsize=7)
    ax.set_xlabel("predicted per-token latency (ms)")
    ax.set_ylabel("predicted perplexity")
    ax.set_yscale("log")
    ax.set_title(title or "splitlm partition: feasible plans")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
