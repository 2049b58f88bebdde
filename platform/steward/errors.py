"""Errors by intent. The CLI maps each family to one exit code; anything outside them is a bug.

- `StewardError`: something the user can fix (a spec field, a flag, a file, the cluster's size). Exit 2, one
  message naming what to change.
- `RunFailed`: a run started and something outside steward's code ended it (a worker died, a cluster job
  failed, no trial of a sweep completed). Exit 1, the cause, no traceback.
- `RunInterrupted`: a run stopped by Ctrl-C; its state is kept for `--resume`. Exit 130.
- Anything else (a bare ValueError, KeyError...) is a bug in steward or a library: exit 1, the traceback goes to a
  log file and the message points at it.
"""


class StewardError(Exception):
    """A problem the user can fix; the message names the field, flag or file and the fix."""


class ClusterUnreachable(StewardError):
    """No Ray cluster (or Jobs API) answers at the address given."""


class RunFailed(Exception):
    """A run started and failed for a reason outside steward's code; the message carries the root cause."""

    what: str | None = "run failed"  # what the CLI's one line starts with; None: the message says it all


class RunInterrupted(Exception):
    """A run stopped before it finished (Ctrl-C); what it saved can be continued with --resume."""
