"""What every `steward` subcommand shares: the spec arguments, the consoles, and how each kind of error ends."""

import os
import time
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from typer.core import TyperGroup

from steward.errors import RunFailed, RunInterrupted, StewardError
from steward.storage import cache_dir

console, errors = Console(), Console(stderr=True)
Spec = Annotated[Path, typer.Argument(help="Job spec YAML file.")]
Address = Annotated[
    str | None, typer.Option(help="Ray address: omit for an embedded local Ray, `auto` or ray://host:port.")
]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set train.optimizer.lr=3e-4")]
PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        envvar="STEWARD_POLICY",
        help="Policy YAML every spec must meet (default: $STEWARD_POLICY, else ./steward.policy.yaml if present).",
    ),
]


def fail(message: str, code: int) -> NoReturn:
    """Print one unwrapped line (a cluster job's log shows it whole, `steward jobs status` finds it) and exit."""
    errors.print(message, style="red", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(command: Callable) -> Callable:
    """End each kind of error as steward.errors says: a fix for the user (2), a failed run (1), Ctrl-C (130);
    anything else is a bug (1), its traceback written to the run's log (or steward's cache) and pointed at."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StewardError as err:
            fail(f"error: {err}", 2)
        except RunInterrupted as err:
            fail(f"interrupted: {err}", 130)
        except RunFailed as err:
            fail(f"{err.what}: {err}" if err.what else str(err), 1)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:
            log = write_traceback(err)
            reason = "an error in steward or a library, not in your input"
            fail(f"bug: {type(err).__name__}: {err}\n({reason}; traceback in {log})", 1)

    return wrapper


def write_traceback(err: BaseException) -> Path:
    """Append the traceback to the run's log (the pipeline names it on the error), else to steward's cache."""
    log = getattr(err, "run_log", None)
    if log is None:
        log = cache_dir() / "errors" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return log


def default_command(name: str) -> type[TyperGroup]:
    """A command group where `steward GROUP ARGS` means `steward GROUP name ARGS` unless ARGS names a subcommand."""

    class Group(TyperGroup):
        def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
            if args and args[0] not in self.commands and not args[0].startswith("-"):
                args = [name, *args]
            return super().parse_args(ctx, args)

    return Group
