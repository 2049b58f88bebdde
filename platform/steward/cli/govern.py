"""`steward card`, `steward audit verify|show` and `steward policy check|explain`: argument parsing and printing."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Column, Table

from steward.cli.common import PolicyOption, Sets, Spec, console, errors, user_errors
from steward.errors import StewardError

LogOption = Annotated[
    Path | None,
    typer.Option("--log", help="Audit log (default: $STEWARD_AUDIT_LOG, else <output-dir>/audit.jsonl)."),
]
OutputDir = Annotated[Path, typer.Option(help="Folder holding run folders (and, by default, the audit log).")]

audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail: verify the chain, show history.")
policy_app = typer.Typer(no_args_is_help=True, help="Policy as code: check a spec, list the rules in force.")


@user_errors
def card(
    run: Annotated[Path, typer.Argument(help="Run folder (runs/<name>/<run-id>).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print model_card.json instead of the Markdown.")] = False,
) -> None:
    """Print a run's model card (written when training finished)."""
    from steward.govern.card import read_card
    from steward.govern.card_markdown import render_markdown

    found = read_card(run)
    print(json.dumps(found, indent=2) if as_json else render_markdown(found))


def _log(log: Path | None, output_dir: Path) -> Path:
    from steward.govern.audit import log_path

    return log if log is not None else log_path(output_dir)


@audit_app.command("verify")
@user_errors
def audit_verify(log: LogOption = None, output_dir: OutputDir = Path("runs")) -> None:
    """Check the chain, signatures, head and run folders' pins; name the first tampered line (exit 1), else ok."""
    from steward.govern.audit import verify

    path = _log(log, output_dir)
    verdict = verify(path, output_dir)
    if not verdict.ok:
        errors.print(f"{path}: {verdict}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{path}: {verdict}", markup=False, soft_wrap=True)


@audit_app.command("show")
@user_errors
def audit_show(
    run: Annotated[str | None, typer.Option(help="Only events of this run (its id or folder).")] = None,
    deployment: Annotated[str | None, typer.Option(help="Only events of this Serve application.")] = None,
    log: LogOption = None,
    output_dir: OutputDir = Path("runs"),
) -> None:
    """A readable history: when, who, what, which run or deployment, and the details."""
    from steward.govern.audit import history

    # Event names and times are never cut short: the free-text columns wrap instead.
    table = Table(
        "#", Column("time (UTC)", no_wrap=True), "who", Column("event", no_wrap=True), "run / deployment", "details"
    )
    skip = {"seq", "time", "who", "event", "prev", "hash", "run_dir", "run_id", "job", "deployment"}
    for e in history(_log(log, output_dir), run, deployment):
        subject = " / ".join(str(e[k]) for k in ("job", "run_id", "deployment") if e.get(k))
        details = ", ".join(f"{k}={_short(v)}" for k, v in e.items() if k not in skip and v is not None)
        table.add_row(str(e["seq"]), e["time"][:19], e["who"], e["event"], subject, details)
    console.print(table)


def _short(value: object) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict) and "rule" in value[0]:
        return "; ".join(f"{v['rule']} ({v['field']})" for v in value)
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    is_hash = len(text) == 64 and all(c in "0123456789abcdef" for c in text)
    return text[:12] + "…" if is_hash else text


@policy_app.command("check")
@user_errors
def policy_check(spec: Spec, set_: Sets = None, policy: PolicyOption = None) -> None:
    """Check one spec against the policy in force; every violation names the rule, the field and the fix (exit 2)."""
    from steward.govern.policy import PolicyViolation, admit, policy_file
    from steward.spec import load_job

    try:
        job = load_job(spec, set_ or [])
        if policy_file(policy) is None:
            raise StewardError(
                "no policy in force: pass --policy FILE, set $STEWARD_POLICY or add ./steward.policy.yaml"
            )
        loaded = admit(job, policy, "policy check", str(spec))
    except PolicyViolation as err:  # the list of violations is the answer, not an error line
        errors.print(str(err), markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    assert loaded is not None
    console.print(f"[green]ok[/] {spec} meets policy {loaded.label}", highlight=False, soft_wrap=True)


@policy_app.command("explain")
@user_errors
def policy_explain(policy: PolicyOption = None) -> None:
    """List the rules in force, their settings and what each one means."""
    from steward.govern.policy import Rules, explain, load_policy, policy_file

    path = policy_file(policy)
    loaded = load_policy(path) if path else None
    if loaded is None:
        console.print("no policy in force (no --policy, no $STEWARD_POLICY, no ./steward.policy.yaml)")
        console.print("rules a policy can set: " + ", ".join(Rules.model_fields))
        return
    console.print(f"policy {loaded.label}" + (f": {loaded.policy.description}" if loaded.policy.description else ""))
    table = Table("rule", "setting", "meaning")
    for name, setting, meaning in explain(loaded.policy):
        table.add_row(name, ", ".join(map(str, setting)) if isinstance(setting, list) else str(setting), meaning)
    console.print(table)
