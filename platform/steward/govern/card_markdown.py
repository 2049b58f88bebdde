"""A model card as Markdown (model_card.md beside model_card.json): the same facts, for people."""

import json
from typing import Any


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) if items else "- (not stated)"


def _metric_table(overall: dict[str, Any], groups: dict[str, Any]) -> str:
    names = list(overall)
    rows = ["| rows | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    rows.append("| all | | " + " | ".join(_number(overall[n]) for n in names) + " |")
    for column, values in groups.items():
        for value, m in values.items():
            rows.append(
                f"| {column}={value} | {m.get('count', '')} | " + " | ".join(_number(m.get(n)) for n in names) + " |"
            )
    return "\n".join(rows)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict) and "value" in value:  # a metric with an interval
        low, high = value.get("low"), value.get("high")
        interval = f" [{low:.4f}, {high:.4f}]" if isinstance(low, float) and isinstance(high, float) else ""
        return f"{value['value']:.4f}{interval}"
    return "" if value is None else str(value)


def _fairness(fairness: dict[str, Any]) -> str:
    """The fairness gate and, per split, the per-group table of metrics.json's report (a classifier's rates or a
    language model's perplexity, each value with its bootstrap interval) and the split's fairness metrics."""
    report = fairness["report"]
    lines = [f"Fairness gate: **{fairness['gate']}**", *(f"- {p}" for p in fairness.get("problems", []))]
    if not isinstance(report, dict) or not report.get("splits"):
        return "\n".join([*lines, "", "No per-group fairness report (the spec sets no data.group_columns)."])
    column = report.get("group_column", "group")
    for split, found in report["splits"].items():
        groups = found.get("groups", {})
        names = [n for n in next(iter(groups.values()), {}) if n != "count" and not n.endswith("_ci")]
        lines += ["", f"{split} split, by {column}:", "", f"| {column} | n | " + " | ".join(names) + " |"]
        lines.append("|---|---|" + "---|" * len(names))
        for value, row in groups.items():
            cells = " | ".join(_cell(row, name) for name in names)
            lines.append(f"| {value} | {row.get('count', '')} | {cells} |")
        shown = ", ".join(f"{name} {_number(value)}" for name, value in found.get("metrics", {}).items())
        lines += ["", f"Fairness metrics ({split}): {shown or 'none'}"]
    return "\n".join(lines)


def _cell(row: dict[str, Any], name: str) -> str:
    """One table value, with its interval when the row has one (`<name>_ci`: [low, high])."""
    value, interval = row.get(name), row.get(f"{name}_ci")
    if isinstance(value, float) and isinstance(interval, list) and len(interval) == 2:
        return _number({"value": value, "low": interval[0], "high": interval[1]})
    return _number(value)


def _summary(value: Any) -> str:
    return "None recorded." if value is None else "```json\n" + json.dumps(value, indent=2) + "\n```"


def _adapter(adapter: dict[str, Any] | None) -> str:
    if adapter is None:
        return "none (every weight trained)"
    modules = ", ".join(adapter["target_modules"] or []) or "(peft's choice)"
    whole = ", ".join(adapter["trained_whole"]) or "nothing"
    return (
        f"{adapter['type']} r={adapter['r']} alpha={adapter['alpha']:g} on {modules}; trained whole: {whole}; "
        f"{adapter['trainable_parameters']} of {adapter['parameters_while_training']} parameters trained "
        f"({100 * adapter['trainable_share']:.2f}%), merged into the saved model"
    )


def _throughput(train: dict[str, Any]) -> str:
    """The last epoch's samples (and, for text, tokens) a second, as the card's Training line ends."""
    rates = [(train.get(k), unit) for k, unit in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"))]
    shown = [f"{value:,.0f} {unit}" for value, unit in rates if value is not None]
    return f", {', '.join(shown)}" if shown else ""


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, in the section order of Mitchell et al. (2019)."""
    d, use, train = card["model_details"], card["intended_use"], card["training"]
    quant, data = card["quantitative_analyses"], card["training_data"]
    licence = d["licence"]
    return f"""# Model card: {d["name"]} (run {d["run_id"]})

## Model details
- {d["description"] or "No description."}
- Owners: {", ".join(d["owners"]) or "(not stated)"}; contact: {d["contact"] or "(not stated)"}
- Model: {d["family"]} ({d["task"]}), {d["num_parameters"]} parameters; licence {licence["model"] or "(not stated)"}
- Spec hash {d["spec_hash"]}; model weights sha256 {d["model_sha256"]}; card written {d["date"]}

## Intended use
Risk level: **{use["risk"]}**

{_bullets(use["primary_uses"])}

Out of scope:

{_bullets(use["out_of_scope_uses"])}

## Factors
Group columns: {", ".join(card["factors"]["group_columns"]) or "none"}

## Metrics
{", ".join(card["metrics"]["names"])} on the {card["metrics"]["split"]} split; fairness gate: {card["metrics"]["fairness_gate"]}

## Evaluation data
{card["evaluation_data"]["source"]}, {card["evaluation_data"]["split"]} split, {card["evaluation_data"]["num_samples"]} examples; data sha256 {card["evaluation_data"]["data_sha256"]}

## Training data
{data["source"]}, splits {data["splits"]}, {data["modality"]} data, licence {licence["data"] or "(not stated)"}

Privacy: {_summary(data["privacy"])}

Training: {train["strategy"]} ZeRO-{train["zero_stage"]}, {train["workers"]} worker(s), {train["precision"]}, {train["epochs_run"]}/{train["epochs_planned"]} epochs, {train["train_time_s"]} s training{_throughput(train)}

Adapter: {_adapter(train["adapter"])}

## Quantitative analyses
{_metric_table(quant["overall"], quant["per_group"])}

{_fairness(card["fairness"])}

Fairness mitigation: {_summary(card["fairness"]["mitigation"])}

Explanations: {_summary(card["explanations"])}

Tuning: {_summary(card["tuning"])}

## Ethical considerations
{_bullets(card["ethical_considerations"])}

## Caveats and recommendations
{_bullets(card["caveats_and_recommendations"])}
"""  # noqa: E501
