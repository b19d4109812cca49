"""The summary and the HTML report of `cds-triage validate` (plots inline as SVG).

The page's style, the operating-point table and the plots are also those of `cds-triage trial`'s
report (`page_head`, `operating_table`, `decision_plots`), so both read alike."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.core.evaluation import format_estimate

LISTED = 200  # skipped inputs and rows the report lists by name


def ci_text(block: dict[str, Any] | None, digits: int = 3) -> str:
    """'0.912 (0.871–0.944; 93/102)', or 'n/a'."""
    return format_estimate(block, digits, missing="n/a")


STYLE = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:1rem auto;padding:0 1rem;color:#222}"
         "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}"
         ".warning{background:#fff3cd;border:1px solid #e0c36b;padding:.5rem 1rem}.plots{display:flex;flex-wrap:wrap;gap:1rem}"
         "figure{margin:0}")


def page_head(title: str, extra_style: str = "") -> str:
    """The start of a self-contained report page: no external asset, so it opens offline."""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}{extra_style}</style></head><body>")


def operating_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The operating points (`evaluation.operating_point`) as a table: every proportion with its interval
    (a threshold of None: each study's own recorded call)."""
    e = html.escape
    return ("<table><tr><th>threshold</th><th>value</th><th>sensitivity</th><th>specificity</th>"
            "<th>PPV</th><th>NPV</th><th>raised</th><th>TP / FP / FN / TN</th></tr>"
            + "".join(f"<tr><td>{e(name)}</td><td>{'as recorded' if point['threshold'] is None else format(point['threshold'], '.4f')}</td>"
                      + "".join(f"<td>{e(ci_text(point[k]))}</td>" for k in ("sensitivity", "specificity", "ppv", "npv", "raised"))
                      + f"<td>{point['tp']} / {point['fp']} / {point['fn']} / {point['tn']}</td></tr>" for name, point in rows)
            + "</table>")


def operating_rows(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    metrics = doc["metrics"]
    rows = [(name, point) for name, point in metrics["at_thresholds"].items()]
    rows += [(f"sensitivity ≥ {point['target_sensitivity']:.2f} here", point) for point in metrics["at_target_sensitivity"]]
    return rows


def summary_lines(doc: dict[str, Any], report: Path | None) -> list[str]:
    """What the terminal shows."""
    m = doc["metrics"]
    lines = [f"{doc['task']}: {doc['model']['name']} {doc['model']['version']} on {m['n']} {doc['unit']} units "
             f"({m['positives']} positive, {m['negatives']} negative); score {doc['score']}",
             f"AUC {ci_text(m['auc'])} [{m['auc']['interval']}]"]
    for name, point in operating_rows(doc):
        lines.append(f"  {name:<28} t={point['threshold']:.4f}  sensitivity {ci_text(point['sensitivity'], 2)}  "
                     f"specificity {ci_text(point['specificity'], 2)}  PPV {ci_text(point['ppv'], 2)}")
    cal = m["calibration"]
    lines.append(f"calibration: Brier {cal['brier']} (always saying the prevalence: {cal['brier_at_prevalence']}), "
                 f"ECE {cal['ece']} over {cal['bin_count']} bins")
    for label, sub in doc.get("subtypes", {}).items():
        lines.append(f"  {label}: AUC {ci_text(sub['auc'])}, {sub['positives']} positive")
    lines += [f"warning: {w}" for w in m["warnings"] + doc.get("skipped_warnings", [])]
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    if report:
        lines.append(f"report: {report}")
    return lines


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def plots(doc: dict[str, Any]) -> dict[str, str]:
    """ROC, precision-recall and calibration plots of the report's units."""
    y = np.array([u["truth"] for u in doc["units"]], dtype=bool)
    p = np.array([u["score"] for u in doc["units"]], dtype=np.float64)
    return decision_plots(y, p, doc["metrics"], operating_rows(doc))


def decision_plots(y: np.ndarray, p: np.ndarray, m: dict[str, Any], marks: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """ROC, precision-recall and calibration plots as inline SVG (matplotlib, which the project depends on),
    from the truth, the scores, their `binary_validation` and the operating points to mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    out: dict[str, str] = {}
    if y.any() and (~y).any():
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"AUC {ci_text(m['auc'])}")
        for name, point in marks:
            ax.plot(1 - point["specificity"]["value"], point["sensitivity"]["value"], "o", label=f"{name} ({point['threshold']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({m['positives']} positive, {m['negatives']} negative)")
        ax.legend(loc="lower right", fontsize=7)
        out["roc"] = _svg(fig)
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, drawstyle="steps-post", label=f"average precision {m['average_precision']}")
        ax.axhline(y.mean(), color="k", ls=":", lw=0.8, label=f"prevalence {y.mean():.2f}")
        for name, point in marks:
            if point["ppv"]["value"] is not None:
                ax.plot(point["sensitivity"]["value"], point["ppv"]["value"], "o", label=name)
        ax.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title="Precision-recall", ylim=(0, 1.02))
        ax.legend(loc="lower left", fontsize=7)
        out["pr"] = _svg(fig)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    bins = m["calibration"]["bins"]
    if bins:
        x = [b["mean_predicted"] for b in bins]
        obs = [b["observed"]["value"] for b in bins]
        err = [[o - b["observed"]["ci95"][0] for o, b in zip(obs, bins)], [b["observed"]["ci95"][1] - o for o, b in zip(obs, bins)]]
        ax.errorbar(x, obs, yerr=err, fmt="o-", capsize=3, label="observed share positive (Wilson 95%)")
        for xi, oi, b in zip(x, obs, bins):
            ax.annotate(f"n={b['n']}", (xi, oi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    ax.set(xlabel="mean predicted score", ylabel="observed share positive", xlim=(0, 1), ylim=(-0.02, 1.02),
           title=f"Calibration: Brier {m['calibration']['brier']}, ECE {m['calibration']['ece']}")
    ax.legend(loc="lower right", fontsize=7)
    out["calibration"] = _svg(fig)
    return out


def html_report(doc: dict[str, Any]) -> str:
    """One self-contained HTML page: figures, warnings, plots (inline SVG), every study's score."""
    e = html.escape
    m = doc["metrics"]
    svgs = plots(doc)
    warnings = m["warnings"] + doc.get("skipped_warnings", [])
    parts = [
        page_head(f"Local validation: {doc['task']}"),
        f"<h1>Local validation of {e(doc['model']['name'])} {e(doc['model']['version'])} ({e(doc['task'])})</h1>",
        f"<p>{m['n']} labelled {e(doc['unit'])} units ({m['positives']} positive, {m['negatives']} negative) from "
        f"<code>{e(str(doc.get('labels', '')))}</code>, scored {e(str(doc.get('created', '')))} exactly as "
        f"<code>cds-triage triage</code> and the service score them. Score: {e(doc['score'])}.</p>",
        "<p><strong>AI-generated triage, preliminary, not a diagnosis.</strong> Every figure comes with its 95% interval: "
        "Wilson score intervals for proportions (with the count), a stratified bootstrap for the AUC. Thresholds chosen "
        "for a sensitivity on this same set reach it by construction: read the specificity beside them.</p>",
    ]
    if warnings or doc.get("notes"):
        parts.append("<div class='warning' id='warnings'><strong>Read this first</strong><ul>"
                     + "".join(f"<li>{e(w)}</li>" for w in warnings + doc.get("notes", [])) + "</ul></div>")
    parts += [f"<h2>Discrimination</h2><p>AUC {e(ci_text(m['auc']))} ({e(m['auc']['interval'])}); average precision "
              f"{e(str(m['average_precision']))}.</p>",
              "<h2>Operating points</h2>" + operating_table(operating_rows(doc))]
    if doc.get("subtypes"):
        parts.append("<h2>Subtypes</h2><table><tr><th>subtype</th><th>positive / negative</th><th>AUC</th>"
                     "<th>sensitivity at the card's threshold</th><th>specificity</th></tr>")
        for label, sub in doc["subtypes"].items():
            point = sub["at_card_threshold"]
            parts.append(f"<tr><td>{e(label)}</td><td>{sub['positives']} / {sub['negatives']}</td><td>{e(ci_text(sub['auc']))}</td>"
                         f"<td>{e(ci_text(point['sensitivity']))}</td><td>{e(ci_text(point['specificity']))}</td></tr>")
        parts.append("</table>")
    if doc.get("raised_per_class"):
        names = list(next(iter(doc["raised_per_class"].values())))
        parts.append("<h2>Raised per class</h2><table><tr><th>class</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for cls, shares in doc["raised_per_class"].items():
            parts.append(f"<tr><td>{e(cls)}</td>" + "".join(f"<td>{e(ci_text(shares[n]))}</td>" for n in names) + "</tr>")
        parts.append("</table>")
    cal = m["calibration"]
    parts.append(f"<h2>Calibration</h2><p>Brier score {cal['brier']} (always saying the prevalence scores "
                 f"{cal['brier_at_prevalence']}); expected calibration error {cal['ece']} over {cal['bin_count']} "
                 f"equal-width bins; mean score {cal['mean_predicted']} against a prevalence of {cal['prevalence']}.</p>"
                 "<table><tr><th>bin</th><th>studies</th><th>mean score</th><th>observed share positive</th></tr>"
                 + "".join(f"<tr><td>{b['lower']:.1f}–{b['upper']:.1f}</td><td>{b['n']}</td><td>{b['mean_predicted']}</td>"
                           f"<td>{e(ci_text(b['observed']))}</td></tr>" for b in cal["bins"]) + "</table>")
    parts.append("<h2>Plots</h2><div class='plots'>")
    for key, caption in (("roc", "ROC"), ("pr", "Precision-recall"), ("calibration", "Calibration (reliability)")):
        if key in svgs:
            parts.append(f"<figure id='{key}-plot'>{svgs[key]}<figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    if doc.get("site_thresholds"):
        written = doc["site_thresholds"]
        parts.append(f"<h2>Site threshold written</h2><p><code>{e(written['file'])}</code>: "
                     f"{e(json.dumps(written['entry']['thresholds']))} for sensitivity {written['entry']['target_sensitivity']} "
                     f"(set <code>CDS_SITE_THRESHOLDS={e(written['file'])}</code> for the service to use it).</p>")
    parts.append("<h2>Studies</h2><details><summary>every labelled unit with its score</summary><table>"
                 "<tr><th>line</th><th>unit</th><th>truth</th><th>score</th><th>slices</th><th>note</th></tr>"
                 + "".join(f"<tr><td>{u['line']}</td><td>{e(u['name'])}</td><td>{u['truth']}{' ' + e(u['class']) if u.get('class') else ''}"
                           f"</td><td>{u['score']:.4f}</td><td>{u['slices']}</td><td>{e(u.get('note', ''))}</td></tr>"
                           for u in doc["units"]) + "</table></details>")
    for key, title in (("failed", "Could not be scored"), ("unlabelled", "Inputs without a label (skipped)"),
                       ("unmatched_rows", "Labels that match no input (skipped)")):
        if doc.get(key):
            listed = doc[key][:LISTED]
            more = f"<li>… and {len(doc[key]) - LISTED} more (all in --json)</li>" if len(doc[key]) > LISTED else ""
            parts.append(f"<h2>{title} ({len(doc[key])})</h2><ul>"
                         + "".join(f"<li>{e(json.dumps(x) if isinstance(x, dict) else str(x))}</li>" for x in listed)
                         + more + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
