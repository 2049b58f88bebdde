"""Steward on a Ray cluster: job packaging and submission (Jobs API), job management, KubeRay manifests."""
