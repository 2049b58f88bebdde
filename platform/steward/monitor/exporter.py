"""A deployment monitor's Prometheus metrics, through Ray's metrics export (they appear on every node's metrics
endpoint), labelled by deployment and arm: what each closed window judged, alerts, records."""

from ray.util.metrics import Counter, Gauge

ALL_GROUPS = "(all)"  # the `group` label of metrics over every group together


class Exporter:
    """One monitor actor's metrics (it lives in the actor's process)."""

    def __init__(self, deployment: str, arm: str) -> None:
        tags = {"deployment": deployment, "arm": arm}
        self.bias = Gauge("steward_monitor_bias", "Bias metric of the last window.", ("deployment", "arm", "metric"))
        self.rate = Gauge(
            "steward_monitor_selection_rate", "Favourable rate per group.", ("deployment", "arm", "group")
        )
        self.drift = Gauge(
            "steward_monitor_drift", "Drift statistic (PSI) or p-value.", ("deployment", "arm", "test", "signal")
        )
        self.failing = Gauge(
            "steward_monitor_alert_open", "1 while a check is alerting.", ("deployment", "arm", "check")
        )
        self.invalid = Gauge(
            "steward_monitor_invalid_rate",
            "Share of the last window's records refused as invalid.",
            (
                "deployment",
                "arm",
            ),
        )
        self.leak = Gauge(
            "steward_monitor_leak",
            "Generated text's personal-data values of a type (check pii:<type>) or share of n-grams found in the "
            "training text (check regurgitation) in the last window.",
            ("deployment", "arm", "check"),
        )
        self.performance = Gauge(
            "steward_monitor_performance",
            "Accuracy, recall (macro), f1_macro or labelled records (label `metric`) from the late labels of the last "
            f"window that had any, per group (label `group`; {ALL_GROUPS} for all of the window's labels).",
            ("deployment", "arm", "metric", "group"),
        )
        self.records = Counter(
            "steward_monitor_records",
            "Records monitored.",
            (
                "deployment",
                "arm",
            ),
        )
        self.alerts = Counter("steward_monitor_alerts", "Alerts raised.", ("deployment", "arm", "check"))
        for metric in (
            self.bias,
            self.rate,
            self.drift,
            self.failing,
            self.invalid,
            self.leak,
            self.performance,
            self.records,
            self.alerts,
        ):
            metric.set_default_tags(tags)

    def window(self, report: dict, events: list[dict]) -> None:
        for check in report["checks"]:
            if check["value"] is None:
                continue
            if check["kind"] == "bias":
                self.bias.set(check["value"], {"metric": check["name"]})
            elif check["kind"] == "input":
                self.invalid.set(check["value"])
            elif check["kind"] == "leak":
                self.leak.set(check["value"], {"check": check["name"]})
            elif check["kind"] == "performance":
                continue  # exported from the report's performance section, judged or not
            else:
                test, _, signal = check["name"].partition(":")
                self.drift.set(check["value"], {"test": test, "signal": signal})
        for group, rate in report["selection_rates"].items():
            if rate is not None:
                self.rate.set(rate, {"group": group})
        performance = report.get("performance")  # absent from windows judged before it was reported
        if performance:
            for group, scores in [(ALL_GROUPS, performance["overall"]), *performance["groups"].items()]:
                for metric, value in scores.items():
                    if scores["labelled"] and value is not None:  # a window without labels leaves the last values
                        self.performance.set(float(value), {"metric": metric, "group": group})
        for event in events:
            self.failing.set(1.0 if event["event"] == "alert" else 0.0, {"check": event["name"]})
            if event["event"] == "alert":
                self.alerts.inc(1.0, {"check": event["name"]})
