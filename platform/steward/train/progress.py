"""A live rich progress bar per epoch that follows the run's history.jsonl while workers train."""

import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from steward.runs import read_history

SHOWN = ("train_loss", "val_loss", "val_accuracy", "val_perplexity", "samples_per_s", "tokens_per_s")


class HistoryProgress:
    """Context manager: polls the history file from a background thread and renders epochs and live metrics."""

    def __init__(self, history: Path, epochs: int, console: Console | None = None, interval: float = 0.5):
        self.history, self.epochs, self.interval = history, epochs, interval
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.stop = threading.Event()

    def __enter__(self) -> "HistoryProgress":
        done = len([r for r in read_history(self.history) if r["kind"] == "epoch"])
        self.task = self.progress.add_task("epochs", total=self.epochs, completed=done, metrics="starting workers...")
        self.progress.start()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._refresh()
        self.progress.stop()

    def _follow(self) -> None:
        while not self.stop.wait(self.interval):
            self._refresh()

    def _refresh(self) -> None:
        records = read_history(self.history)
        epochs = [r for r in records if r["kind"] == "epoch"]
        last = records[-1] if records else {}
        if last.get("kind") == "step":
            text = f"step {last['step']}  loss {last['loss']:.4f}  lr {last['lr']:.2e}"
            if "tokens_per_s" in last:  # Transformer runs
                text += f"  tokens_per_s {last['tokens_per_s']:.4g}"
        elif last:
            text = "  ".join(f"{k} {last[k]:.4g}" for k in SHOWN if k in last)
        else:
            text = "starting workers..."
        self.progress.update(self.task, completed=len(epochs), metrics=text)
