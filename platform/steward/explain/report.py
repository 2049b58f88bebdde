"""Explanation artifacts: attributions JSON, a PNG heatmap per image, an HTML highlight of tokens."""

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

ATTRIBUTIONS, HEATMAP, TOKENS, PERMUTATION = "attributions.json", "heatmap.png", "tokens.html", "permutation.json"


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """`payload` as indented JSON at `path`."""
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_heatmap(path: Path, images: list[np.ndarray], records: list[dict[str, Any]]) -> Path:
    """One column per instance: the image on top, its attributions below (red adds to the class, blue takes away)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    count = len(records)
    fig, axes = plt.subplots(2, count, figsize=(2.2 * count, 4.6), squeeze=False)
    for i, (image, record) in enumerate(zip(images, records, strict=True)):
        values = np.asarray(record["attributions"], dtype=np.float32)
        values = values.sum(axis=0) if values.ndim == 3 else values  # channels add up to one map
        shown = image.mean(axis=0) if image.ndim == 3 else image
        limit = float(np.abs(values).max()) or 1.0  # symmetric colour scale: white is exactly zero
        axes[0, i].imshow(shown, cmap="gray")
        axes[0, i].set_title(f"{record['target']} ({record['score']:.2f})", fontsize=9)
        axes[1, i].imshow(values, cmap="bwr", vmin=-limit, vmax=limit)
        axes[1, i].set_title(f"delta {record['delta']:.1e}", fontsize=8)
        for axis in axes[:, i]:
            axis.set_xticks([])
            axis.set_yticks([])
    fig.suptitle("Integrated Gradients per pixel (red: towards the class, blue: against)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_token_html(path: Path, records: list[dict[str, Any]]) -> Path:
    """Each text's tokens shaded by attribution (green towards the target class, red against), values on hover."""
    rows = []
    for i, record in enumerate(records):
        values = np.asarray(record["attributions"], dtype=np.float64)
        limit = float(np.abs(values).max()) or 1.0
        spans = [_token_span(token, value, limit) for token, value in zip(record["tokens"], values, strict=True)]
        head = (
            f"#{i}: target <b>{html.escape(record['target'])}</b>, F(x) = {record['score']:.3f}, "
            f"F(baseline) = {record['baseline_score']:.3f}, delta = {record['delta']:.2e}"
        )
        rows.append(f"<div class='row'><div class='head'>{head}</div><div>{' '.join(spans)}</div></div>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>steward explain</title><style>"
        "body{font-family:sans-serif;margin:2em}.row{margin-bottom:1.2em}.head{color:#444;font-size:0.9em}"
        "span.t{padding:2px 3px;border-radius:3px;line-height:2em}</style></head><body>"
        "<h2>Integrated Gradients per token</h2>" + "".join(rows) + "</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def _token_span(token: str, value: float, limit: float) -> str:
    alpha = min(abs(value) / limit, 1.0)
    colour = f"rgba(0,160,0,{alpha:.2f})" if value >= 0 else f"rgba(220,0,0,{alpha:.2f})"
    return f"<span class='t' style='background:{colour}' title='{value:+.4g}'>{html.escape(token)}</span>"
