"""Metrics as text: a metric with its interval, and weights/README.md generated from the model cards."""

from __future__ import annotations

from typing import Any, Sequence

from cds_service.core.domain import DISCLAIMER

def format_metric(block: dict[str, Any], name: str) -> str:
    """'0.953 (95% CI 0.94-0.97)' for reports and the README."""
    m = block.get(name)
    if not m or m["value"] is None:
        return "n/a"
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} (95% CI {lo:.3f}-{hi:.3f})"


def summarise(labels: Sequence[str], block: dict[str, Any]) -> list[str]:
    """Human-readable lines of a metrics block, one per metric."""
    return [f"{name}: {format_metric(block['metrics'], name)}" for name in block["metrics"]]

# --- weights/README.md ---------------------------------------------------------------------


def format_estimate(block: dict[str, Any] | None, digits: int = 3, missing: str = "—") -> str:
    """`0.912 (0.871–0.944)`, with the count for proportions: `0.912 (0.871–0.944; 93/102)`."""
    if not block or block.get("value") is None:
        return missing
    lo, hi = block.get("ci95") or [None, None]
    count = f"; {block['count'][0]}/{block['count'][1]}" if block.get("count") else ""
    ci = f" ({lo:.{digits}f}–{hi:.{digits}f}{count})" if lo is not None and hi is not None else ""
    return f"{block['value']:.{digits}f}{ci}"


def _headline(card: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, validation, test) rows a clinician reads first, per task."""
    val, test = card.get("validation_metrics", {}).get("metrics", {}), card.get("test_metrics", {}).get("metrics", {})
    rows: list[tuple[str, str, str]] = []
    if "presence" in card:
        pv, pt = card["presence"].get("validation", {}), card["presence"].get("test", {})
        rows += [("tumour present: AUC", format_estimate(pv.get("auc")), format_estimate(pt.get("auc"))),
                 ("tumours raised (sensitivity)", format_estimate(pv.get("raised_with_finding")), format_estimate(pt.get("raised_with_finding"))),
                 ("tumour-free images raised", format_estimate(pv.get("raised_without_finding")), format_estimate(pt.get("raised_without_finding")))]
        for label in pv.get("raised_per_class", {}):
            rows.append((f"{label} raised", format_estimate(pv["raised_per_class"][label]), format_estimate(pt.get("raised_per_class", {}).get(label))))
        rows.append(("class accuracy (argmax)", format_estimate(pv.get("class_accuracy")), format_estimate(pt.get("class_accuracy"))))
        return rows
    main = card["trained_labels"][0]
    rows += [(f"{main}: AUC per image", format_estimate(val.get(f"{main}.auc")), format_estimate(test.get(f"{main}.auc"))),
             (f"{main}: sensitivity per image at the threshold", format_estimate(val.get(f"{main}.sensitivity_at_threshold")),
              format_estimate(test.get(f"{main}.sensitivity_at_threshold"))),
             (f"{main}: specificity per image at the threshold", format_estimate(val.get(f"{main}.specificity_at_threshold")),
              format_estimate(test.get(f"{main}.specificity_at_threshold")))]
    series = card.get("series_operating_point")
    if series:
        for key, what in (("series_auc", "series AUC (simulated series)"),
                          ("bleeding_series_raised", "bleeding series raised (simulated)"),
                          ("normal_series_raised", "normal series raised (simulated)")):
            rows.append((what, f"{series['validation'][key]:.3f}", f"{series.get('test', {}).get(key, float('nan')):.3f}"))
    for label in card["trained_labels"][1:]:
        rows.append((f"{label}: AUC per image", format_estimate(val.get(f"{label}.auc")), format_estimate(test.get(f"{label}.auc"))))
    return rows


def weights_readme(cards: Sequence[dict[str, Any]]) -> str:
    """weights/README.md from the model cards: regenerated after every training, never edited by hand
    (`python -m cds_training.training readme`; tests/test_weights.py checks it is current)."""
    lines = [
        "# Model weights and model cards",
        "",
        "<!-- generated from the cards by `python -m cds_training.training readme`; do not edit by hand -->",
        "",
        f"**{DISCLAIMER}** These models only move studies up a radiologist's",
        "worklist; a radiologist reads every study, in full.",
        "",
        "Each task has `<task>.safetensors` (EfficientNet-B0, fp16) and its card `<task>.json`: labels,",
        "preprocessing, operating thresholds, data, training, metrics with 95% intervals and limits. The",
        "service reads only those two. `<task>.split.json` lists every validation and test image with its",
        "truth and the model's probabilities, so anyone can recompute the card (the project's tests do).",
        "",
        "How to read the figures: the data is split once, by patient or by groups of near-identical",
        "images, into **train**, **validation** (chose the epoch and the thresholds) and **test** (chose",
        "nothing). The test column is what to expect; both are small, so read the 95% interval in brackets",
        "(Wilson for proportions, with the count; bootstrap for AUC), not only the number.",
        "",
        "## Summary",
        "",
        "| model | flags | default mode | test figure that matters most |",
        "|---|---|---|---|",
    ]
    for card in cards:
        rows = _headline(card)
        lines.append(f"| `{card['task']}` {card['version']} | {card['intended_use']} | {card.get('default_mode', 'active')} "
                     f"| {rows[0][0]}: {rows[0][2]}; {rows[1][0]}: {rows[1][2]} |")
    for card in cards:
        training, data = card.get("training", {}), card.get("data", {})
        counts, split = data.get("counts", {}), data.get("split", {})
        init = training.get("imagenet_init") or {}
        lines += [
            "",
            f"## {card['task']}: {card['name']} {card['version']} ({card.get('date', '')})",
            "",
            f"**Intended use.** {card['intended_use']}",
            "",
            f"**Default mode:** {card.get('default_mode', 'active')}"
            + (f" — {card['default_mode_reason']}." if card.get("default_mode_reason") else ".")
            + " A site sets its own with `CDS_TASK_MODES`.",
            "",
            "| | validation | test |",
            "|---|---|---|",
        ]
        lines += [f"| {what} | {v} | {t} |" for what, v, t in _headline(card)]
        lines += [
            "",
            f"- **Labels**: {', '.join(card['labels'])}; trained: {', '.join(card['trained_labels'])}"
            + (f"; raise a study: {', '.join(card['priority_labels'])}" if card.get("priority_labels") else ""),
            "- **Operating thresholds**: " + ", ".join(f"`{k}` {v}" for k, v in card["thresholds"].items())
            + f". {card.get('threshold_policy', '')}",
            f"- **Input**: {card['input_size']} × {card['input_size']} px; {card.get('preprocessing_note', '')}",
            f"- **Data**: {data.get('provenance', '')}",
            f"- **Split**: {counts.get('train_total')} train / {counts.get('validation_total')} validation / "
            f"{counts.get('test_total', 0)} test images (seed {split.get('seed')}), by {split.get('unit', '')}. "
            f"Train {counts.get('train')}; validation {counts.get('validation')}; test {counts.get('test')}.",
        ]
        if data.get("extra_training_negatives"):
            extra = data["extra_training_negatives"]
            lines.append(f"- **Extra training negatives**: {extra['count']} images from `{extra['dir']}` ({extra['use']}).")
        if card.get("input_check"):
            lines.append(input_check_line(card["input_check"]))
        if card.get("external_check"):
            lines.append(external_check_line(card["external_check"]))
        if card.get("cross_validation"):
            lines.append(cross_validation_line(card["cross_validation"]))
        if card.get("acquisition_shift"):
            lines.append(acquisition_shift_line(card["acquisition_shift"]))
        lines += [
            f"- **Start**: {training.get('init_from', '')}"
            + (f"; {init.get('source')}, file sha256 `{init.get('file_sha256')}`, "
               f"{init.get('parameter_share_from_imagenet', 0):.0%} of the parameters from ImageNet" if init else ""),
            f"- **Training**: {training.get('hardware')}; {training.get('epochs_run')} of {training.get('epochs_planned')} "
            f"epochs, best {training.get('best_epoch')}; {training.get('time_minutes')} min "
            f"({training.get('seconds_per_epoch')} s per epoch); {training.get('optimizer')}, {training.get('schedule')}"
            + "".join(f"; {training[key]}" for key in ("stochastic_depth", "weight_average") if training.get(key)) + ".",
            f"- **Command**: `{training.get('command') or 'see the card'}`",
            "",
            "Limits:",
            "",
        ]
        lines += [f"- {item}" for item in card.get("limitations", [])]
    lines += ["", "Re-score a committed model on its validation split: `cds-triage evaluate --task <task> --data ../shared/data`.",
              "Re-choose its operating points from the stored probabilities (no images needed):",
              "`python -m cds_training.training rethreshold --task <task> --target <sensitivity>`.", ""]
    return "\n".join(lines)


def external_check_line(block: dict[str, Any]) -> str:
    """The model card's line on its external set (weights/README.md)."""
    auc, at = block["auc"], block["at_card_threshold"]
    sens, spec = at["sensitivity"], at["specificity"]
    checked = block.get("input_check")
    check = (f"; the input check found {checked['familiar']} familiar, {checked['unfamiliar']} unfamiliar (scored, marked) "
             f"and refused {checked['refused']}") if checked else ""
    return (f"- **Another source, never trained on** ({block['what']}; {block['images']} images): AUC ({block['label']}) "
            f"{auc['value']} ({auc['ci95'][0]}-{auc['ci95'][1]}); at the card's threshold {at['threshold']} "
            f"{sens['count'][0]}/{sens['count'][1]} positives and {spec['count'][1] - spec['count'][0]}/{spec['count'][1]} "
            f"negatives raised, {block['unit']}{check}." + (f" {block['note']}" if block.get("note") else ""))


def input_check_line(check: dict[str, Any]) -> str:
    """The model card's input-check line: what each source of the right anatomy and the other tasks' images get."""
    if "same_anatomy" not in check:  # a card measured before images were marked unfamiliar rather than refused
        accepted = "; ".join(f"{name} {v['count']}/{v['of']}" for name, v in check.get("accepted", {}).items())
        refused = "; ".join(f"{name} {v['count']}/{v['of']}" for name, v in check.get("refused_other_tasks", {}).items())
        return (f"- **Input check** (`{check['file']}`): {check['statistics']}; refused above {check['threshold']} "
                f"({check['threshold_policy']}). Accepted: {accepted}. Refused, images of other tasks: {refused}.")

    def shares(block: dict[str, Any]) -> str:
        return ", ".join(f"{v['count']}/{v['of']} {key}" for key, v in block.items() if v["count"])

    same = "; ".join(f"{name}: {shares(v)}" for name, v in check["same_anatomy"].items())
    other = "; ".join(f"{name}: {shares(v)}" for name, v in check["other_tasks"].items())
    return (f"- **Input check** (`{check['file']}`): {check['statistics']}; familiar up to {check['threshold']} "
            f"({check['threshold_policy']}), scored and marked unfamiliar above, refused beyond {check['refuse_beyond']} "
            f"({check['refuse_beyond_policy']}); the wrong modality or body part in the DICOM header, and a CT that is not "
            f"head-shaped, are refused too. Right anatomy: {same}. Images of the other tasks (pixels alone): {other}.")


def acquisition_shift_line(block: dict[str, Any]) -> str:
    """The model card's line on its acquisition-shift check (weights/README.md): per change, the tumours
    raised (per class) and the tumour-free images raised."""
    def count(entry: dict[str, Any]) -> str:
        return f"{entry['count'][0]}/{entry['count'][1]}"

    negative = block["negative_label"]
    parts = []
    for name, entry in block["changes"].items():
        classes = ", ".join(f"{label} {count(v)}" for label, v in entry["raised"].items() if label != negative)
        parts.append(f"{name}: tumours {count(entry['tumours_raised'])} ({classes}), tumour-free raised "
                     f"{count(entry['raised'][negative])}" + (f", refused {entry['refused']['count'][0]}" if "refused" in entry else ""))
    return (f"- **Test images re-made as other scanners might** ({block['images']} images; {block['what']}; "
            f"a refused tumour counts as missed): " + "; ".join(parts) + f". {block['limits'].capitalize()}.")


def cross_validation_line(block: dict[str, Any]) -> str:
    """The model card's line on its grouped cross-validation (weights/README.md): what unseen patients get."""
    auc, pooled = block["fold_auc"], block["pooled_out_of_fold_auc"]
    sens, spec = block["at_fold_thresholds"]["sensitivity"], block["at_fold_thresholds"]["specificity"]
    per_fold = ", ".join(f"{f['auc']:.3f}" for f in block["folds"])
    return (f"- **Grouped cross-validation** ({len(block['folds'])} folds; {block['method']}): AUC ({block['label']}) per fold "
            f"{per_fold} (mean {auc['mean']:.3f}, sd {auc['sd']:.3f}); all out-of-fold images pooled {pooled['value']:.3f} "
            f"({pooled['ci95'][0]:.3f}-{pooled['ci95'][1]:.3f}; {pooled['images']} images, {pooled['positives']} positive), "
            f"against {block['card_test_auc']:.3f} on the card's test split; at each fold's own threshold "
            f"{sens['count'][0]}/{sens['count'][1]} positives raised (sensitivity {sens['value']:.3f}, "
            f"{sens['ci95'][0]:.3f}-{sens['ci95'][1]:.3f}) and {spec['count'][1] - spec['count'][0]}/{spec['count'][1]} "
            f"negatives raised (specificity {spec['value']:.3f}). Command: `{block['command']}`.")
