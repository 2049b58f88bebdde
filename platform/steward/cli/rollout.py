"""`steward rollout start|status|promote|abort`: argument parsing and printing."""

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from steward.cli.common import Address, PolicyOption, Sets, Spec, console, fail, user_errors
from steward.cli.serve import ClusterAddress, Override
from steward.govern.policy import admit, policy_file
from steward.ray_env import is_local
from steward.spec import load_job

rollout_app = typer.Typer(
    no_args_is_help=True,
    help="Bring a challenger beside the live champion (shadow or canary steps) and promote or roll it back on gates "
    "judged on the same traffic: fairness, drift, errors, latency, late-label accuracy.",
)
Name = Annotated[str, typer.Argument(help="Serve application name (serve.name, else the job's name).")]
Reason = Annotated[str, typer.Option(help="Why: recorded in the rollout's events and the audit log.")]


@rollout_app.command("start")
@user_errors
def rollout_start(
    spec: Spec,
    challenger: Annotated[
        str, typer.Option(help="The challenger: a run folder, or a registered version models:/NAME@ALIAS.")
    ],
    set_: Sets = None,
    run: Annotated[str | None, typer.Option(help="The champion's run folder (default: the newest succeeded).")] = None,
    address: Address = None,
    host: Annotated[str, typer.Option(help="HTTP host Serve listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port Serve listens on.")] = 8000,
    policy: PolicyOption = None,
    override_fairness_gate: Override = None,
) -> None:
    """Deploy the champion with the challenger beside it as serve.rollout says, and start moving traffic (embedded
    Ray: follows the rollout until Ctrl-C; --address: returns once deployed)."""
    from steward.serve.deploy import start_rollout, stop
    from steward.serve.source import find_run

    job = load_job(spec, set_ or [])
    admit(job, policy, "rollout", str(spec))
    champion = find_run(job, Path(run) if run else None)
    if challenger.startswith("models:/"):
        from steward.serve.registry import served_version

        rival = served_version(job, challenger)
    else:
        rival = find_run(job, Path(challenger), "--challenger")
    in_force = policy_file(policy)
    deployed = start_rollout(
        job, champion, rival, address, host, port, override_fairness_gate, str(in_force) if in_force else None
    )
    console.print(f"rollout of [bold]{deployed.name}[/] at {deployed.url}: champion {champion}, challenger {rival}")
    if not is_local(address):
        console.print(f"follow it with: steward rollout status {deployed.name} --address {address}")
        return
    console.print("embedded Ray: following the rollout until Ctrl-C")
    with contextlib.suppress(KeyboardInterrupt):
        _follow(deployed.name)
    console.print(f"stopping {deployed.name}: saving the monitors' state")
    stop(deployed.name, address, job.output_dir)


def _follow(name: str) -> None:
    """Print each decision as the rollout makes it."""
    import ray

    from steward.serve.rollout import find_rollout

    shown = 0.0  # the time of the last decision printed
    while True:
        for decision in ray.get(find_rollout(name).status.remote())["decisions"]:
            if decision["time"] > shown:
                console.print(_decision_line(decision), markup=False)
                shown = decision["time"]
        time.sleep(1.0)


def _decision_line(decision: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(decision["time"]))
    line = f"{when} {decision['decision']} (step {decision['step']})"
    if "share" in decision:
        line += f": challenger share {decision['share']:g}"
    for gate in decision.get("failed", []):
        line += f"; {gate['gate']} = {gate['value']} (limit {gate['limit']}) {gate['detail']}"
    for key in ("reason", "refused"):
        if decision.get(key):
            line += f"; {key}: {decision[key]}"
    return line


def _rollout(name: str, address: str) -> Any:
    from steward.ray_env import connect
    from steward.serve.rollout import find_rollout

    connect(address)
    actor = find_rollout(name)
    if actor is None:
        fail(f"error: no rollout of {name!r} on this cluster; start one with `steward rollout start SPEC`", 2)
    return actor


@rollout_app.command("status")
@user_errors
def rollout_status(
    name: Name,
    address: ClusterAddress = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole status as JSON.")] = False,
) -> None:
    """The rollout's state, step and share, each arm's requests, errors and latency, and its decisions."""
    import ray

    status = ray.get(_rollout(name, address).status.remote())
    if as_json:
        print(json.dumps(status, indent=2))
        return
    console.print(
        f"{name}: {status['mode']} {status['state']}, step {status['step']} of {status['steps']}, "
        f"challenger share {status['share']:g}",
        markup=False,
    )
    for arm, stats in status["arms"].items():
        console.print(f"  {arm:10} {json.dumps(stats)}", markup=False)
    for decision in status["decisions"]:
        console.print("  " + _decision_line(decision), markup=False)


@rollout_app.command("promote")
@user_errors
def rollout_promote(name: Name, reason: Reason, address: ClusterAddress = "auto") -> None:
    """Promote the challenger now (it answers every request), if the policy in force admits its run."""
    import ray

    status = ray.get(_rollout(name, address).promote.remote(reason))
    if status["state"] != "promoted":
        fail(f"error: not promoted: {_decision_line(status['decisions'][-1])}", 2)
    console.print(f"promoted: {status['challenger']} answers every request of {name}", markup=False)


@rollout_app.command("abort")
@user_errors
def rollout_abort(name: Name, reason: Reason, address: ClusterAddress = "auto") -> None:
    """Send every request back to the champion."""
    import ray

    status = ray.get(_rollout(name, address).abort.remote(reason))
    console.print(f"{status['state']}: the champion {status['champion']} answers every request of {name}", markup=False)


@rollout_app.command("report")
@user_errors
def rollout_report(
    target: Annotated[Path, typer.Argument(help="A rollout folder, or a deployment name (its newest rollout).")],
    output_dir: Annotated[Path, typer.Option(help="Folder of run folders, to find a deployment by name.")] = Path(
        "runs"
    ),
    out: Annotated[Path | None, typer.Option(help="Folder for report.html (default: the rollout folder).")] = None,
) -> None:
    """Write an HTML page with the rollout's decisions and both arms' windows side by side."""
    from steward.monitor.rollout_report import write_rollout_report

    folder = target
    if not (target / "state.json").exists():
        found = sorted((output_dir / "rollouts" / target.name).glob("*/state.json"))
        folder = found[-1].parent if found else target  # rollout ids sort by their start time
    console.print(f"wrote [bold]{write_rollout_report(folder, out)}[/]")
