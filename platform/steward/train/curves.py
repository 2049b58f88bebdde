"""A small PNG of the training curves, drawn from the run's metrics history."""

from pathlib import Path

from steward.runs import read_history


def plot_history(history: Path, out: Path) -> Path | None:
    """Loss per step on the left, validation metrics per epoch on the right."""
    import matplotlib  # here: only a finished run plots, and matplotlib takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_history(history)
    epochs = [r for r in records if r["kind"] == "epoch"]
    if not epochs:
        return None
    steps = [r for r in records if r["kind"] == "step"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if steps:
        left.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss (step)", alpha=0.6)
    left.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="train loss (epoch)")
    if "val_loss" in epochs[0]:
        left.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "s-", label="val loss")
    left.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    left.legend()
    for key in ("val_accuracy", "val_perplexity"):
        if key in epochs[0]:
            right.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], "o-", label=key)
    right.set(xlabel="epoch", title="Validation")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
