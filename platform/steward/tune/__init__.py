"""Ray Tune sweeps over fields of the job spec: the search space, the trials, and what a sweep leaves."""
