"""What every `steward` subcommand shares: the spec arguments, the consoles, and how user errors end."""

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console, errors = Console(), Console(stderr=True)
Spec = Annotated[Path, typer.Argument(help="Job spec YAML file.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set train.optimizer.lr=3e-4")]


def user_errors(command: Callable) -> Callable:
    """Turn the errors a user can fix into a message and exit code 2; a failed run into exit code 1.

    Each message is one line, never wrapped (soft_wrap), so a cluster job's log shows it whole and
    `steward jobs status` can find it there.
    """

    @wraps(command)
    def wrapper(*args, **kwargs):
        from steward.cluster.jobs import JobFailed
        from steward.train.launch import TrainingError

        try:
            return command(*args, **kwargs)
        except TrainingError as err:
            errors.print(
                f"training failed: {err}", style="red", markup=False, soft_wrap=True
            )  # worker text may hold [brackets]
            raise typer.Exit(1) from None
        except JobFailed as err:
            errors.print(str(err), style="red", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except (ValueError, FileNotFoundError) as err:
            errors.print(f"error: {err}", style="red", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
