"""What every `steward` subcommand shares: the spec arguments, the consoles, and how user errors end."""

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

console, errors = Console(), Console(stderr=True)
Spec = Annotated[Path, typer.Argument(help="Job spec YAML file.")]
Address = Annotated[
    str | None, typer.Option(help="Ray address: omit for an embedded local Ray, `auto` or ray://host:port.")
]
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


def default_command(name: str) -> type[TyperGroup]:
    """A command group where `steward GROUP ARGS` means `steward GROUP name ARGS` unless ARGS names a subcommand."""

    class Group(TyperGroup):
        def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
            if args and args[0] not in self.commands and not args[0].startswith("-"):
                args = [name, *args]
            return super().parse_args(ctx, args)

    return Group
