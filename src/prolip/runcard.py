"""A run's card: the README.md ``prolip fit`` writes into the run directory (and ``prolip export`` copies beside the
checkpoint as its model card): the model, the data, the few-shot setting, the hyperparameters and how they were
chosen, zero-shot against adapted accuracy, the top confusions, and the command that does it again.

Rendered from the run's manifest alone (pure), so every number in it is one the manifest records.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

HOW_CHOSEN = {
    "validation": "selected on the N-shot validation set",
    "rule": "set by the method's rule for this data",
    "given": "as given",
    "loaded": "as loaded",
}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``prolip`` and its arguments, shell-quoted), with the folder it ran in, so relative
    paths in it still mean the same files."""
    args = sys.argv[1:] if argv is None else argv
    return f"cd {shlex.quote(os.getcwd())} && " + shlex.join(["prolip", *args])


def _percent(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}%"


def _model_lines(manifest: dict) -> list[str]:
    b = manifest["backbone"]
    weights = f"`{b['weights']}`" + (
        ": **RANDOM weights**, every number below means nothing about CLIP" if b.get("random_weights") else ""
    )
    return [
        "## Model",
        "",
        f"- backbone: {b['family']} `{b['arch']}`, weights {weights}",
        f"- weights fingerprint: `{b['fingerprint'][:16]}…` (a run only applies to these weights)",
        f"- method: `{manifest['method']['method']}`",
        "",
    ]


def _data_lines(manifest: dict) -> list[str]:
    data, fit, metrics = manifest.get("data", {}), manifest.get("fit", {}), manifest.get("metrics", {})
    size = f", {data['train_images']} training images" if data.get("train_images") is not None else ""
    lines = [
        "## Data",
        "",
        f"- `--data {data.get('spec')}` ({data.get('name')}: {data.get('num_classes')} classes{size})",
        f"- {fit.get('shots')} shots per class ({len(data.get('support', []))} support images), seed "
        f"{fit.get('seed')}, sampler `{fit.get('sampler')}`, {fit.get('views')} cached augmented views "
        f"(`{data.get('augmentation')}`, augmentation seed {fit.get('aug_seed')})",
    ]
    if fit.get("use_validation"):
        lines.append(f"- validation: {len(data.get('validation', []))} images ({fit.get('shots')} per class)")
    lines.append(f"- evaluated on {metrics.get('eval_images', 0)} {data.get('eval_set', 'images')}")
    return lines + [""]


def _hyperparameter_lines(manifest: dict) -> list[str]:
    method, given = manifest["method"], manifest.get("fit", {}).get("hyperparameters", {})
    selected = dict(method.get("selected") or {})
    how = selected.pop("how", None)
    lines = ["## Hyperparameters", "", "| name | value | how it was chosen |", "|---|---|---|"]
    for name, value in method.get("hyperparameters", {}).items():
        origin = "given (--hp)" if name in given else "default"
        chosen = selected.get(name, value)
        if isinstance(chosen, (list, dict)) and not isinstance(value, (list, dict)):
            chosen = value  # a record under the same name (the searched grid), not a value put in its place
        elif chosen != value or (how == "validation" and name in selected and _is_number(chosen)):
            origin = f"{HOW_CHOSEN.get(how, str(how))} (from {origin} `{_short(value)}`)"
            selected.pop(name)
        lines.append(f"| {name} | `{_short(chosen)}` | {origin} |")
    selected = {k: v for k, v in selected.items() if v != method.get("hyperparameters", {}).get(k)}
    if selected:  # what the method recorded besides its hyperparameters (the rule it applied, a validation score)
        lines += ["", "Also recorded: " + ", ".join(f"{k} = `{_short(v)}`" for k, v in selected.items()) + "."]
    return lines + [""]


def _cell(text: str) -> str:
    """A class name inside a markdown table: a '|' in it would split the cell."""
    return str(text).replace("|", "\\|")


def _is_number(value: Any) -> bool:
    """What a validation search selects (lr, λ, α, C, an epoch), as opposed to settings it records (a tie rule)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """A value as JSON; a long list as its length (the manifest has it whole)."""
    if isinstance(value, list) and len(json.dumps(value)) > 60:
        return f"[{len(value)} entries]"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _result_lines(manifest: dict) -> list[str]:
    m = manifest.get("metrics", {})
    if m.get("accuracy") is None:
        return ["## Results", "", f"Not evaluated: no {m.get('eval_set', 'images')} were left.", ""]
    gain = m["accuracy"] - m["zero_shot_accuracy"]
    lines = [
        "## Results",
        "",
        "| | top-1 | top-5 | mean per-class |",
        "|---|---:|---:|---:|",
        f"| zero-shot CLIP | {_percent(m['zero_shot_accuracy'])} | | |",
        f"| adapted | {_percent(m['accuracy'])} ({gain:+.2f}) | {_percent(m.get('top5_accuracy'))} | "
        f"{_percent(m.get('mean_per_class_accuracy'))} |",
        "",
    ]
    if m.get("most_confused"):
        lines += [
            "Most confused classes (true → predicted, adapted model):",
            "",
            "| true | predicted | images | share of the true class |",
            "|---|---|---:|---:|",
        ]
        lines += [
            f"| {_cell(c['true'])} | {_cell(c['predicted'])} | {c['count']} | {c['share']:.0f}% |"
            for c in m["most_confused"]
        ]
        lines.append("")
    if m.get("worst_classes"):
        worst = ", ".join(f"{w['class']} ({_percent(w['accuracy'])})" for w in m["worst_classes"])
        lines += [f"Least accurate classes: {worst}.", ""]
    return lines


def render(manifest: dict[str, Any], command: str | None = None) -> str:
    """The run card of a run with this manifest; ``command``: how it was made (None: through the Python API)."""
    data, shots = manifest.get("data", {}), manifest.get("fit", {}).get("shots")
    title = f"# {manifest['method']['method']} on {data.get('name', 'data')}, {shots}-shot"
    lines = [
        title,
        "",
        f"A prolip run (prolip {manifest.get('prolip_version', '?')}, {manifest.get('created', '')}): "
        "few-shot CLIP adaptation. Everything here is read from `manifest.json` beside it.",
        "",
    ]
    lines += _model_lines(manifest) + _data_lines(manifest) + _hyperparameter_lines(manifest) + _result_lines(manifest)
    lines += ["## Reproduce", ""]
    if command:
        lines += ["```bash", command, "```"]
    else:
        lines += [
            "Fitted through the Python API (`prolip.pipeline.fit`) with the settings under `fit` in `manifest.json`."
        ]
    return "\n".join(lines) + "\n"
