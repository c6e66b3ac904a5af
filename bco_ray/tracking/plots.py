"""PNG plots of a finished run, drawn from its MLflow metric history (matplotlib, no display)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PANELS = [("loss", ["loss", "eval/loss"]), ("rewards", ["rewards/chosen", "rewards/rejected"]),
          ("margins", ["rewards/margins"]), ("delta", ["delta"]), ("eval_auc", ["eval/auc", "eval/accuracy"])]


def plot_run(client: MlflowClient, run_id: str, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, keys in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key in keys:
            hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if hist:
                ax.plot([m.step for m in hist], [m.value for m in hist], marker="." if len(hist) < 30 else None,
                        label=key)
                drawn = True
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = os.path.join(out_dir, f"{name}.png")
            fig.savefig(path, dpi=100)
            paths.append(path)
        plt.close(fig)
    return paths


def plot_weight_hist(hist: dict, out_path: str) -> str:
    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge", edgecolor="k")
    ax.set_xlabel("UDM weight of undesirable rows")
    ax.set_ylabel("rows")
    ax.set_title("UDM density-ratio weights")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
