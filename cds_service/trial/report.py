"""The summary and the HTML report of `cds-triage trial`, in `cds-triage validate`'s style (its page
head, operating-point table and plots, inline SVG: the page has no external asset)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.trial.figures import AT_TRIAGE
from cds_service.validate.report import LISTED, ci_text, decision_plots, operating_table, page_head

GROUPS = {  # turnaround group -> (active wording, shadow wording)
    "raised": ("raised by triage", "triage would have raised"),
    "not_raised": ("not raised", "triage would not have raised"),
    "positives_raised": ("positives raised", "positives triage would have raised"),
    "positives_missed": ("positives missed", "positives triage would have missed"),
}


def operating_rows(figures: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """As decided at triage, then at each named threshold, then at the sensitivity targets."""
    metrics = figures["metrics"]
    return ([(AT_TRIAGE, figures["at_triage"])] + list(metrics["at_thresholds"].items())
            + [(f"sensitivity ≥ {p['target_sensitivity']:.2f} here", p) for p in metrics["at_target_sensitivity"]])


def hours(value: float | None) -> str:
    """Hours as '3 h 05 min' (or 'n/a')."""
    if value is None:
        return "n/a"
    minutes = int(round(value * 60))
    return f"{minutes // 60} h {minutes % 60:02d} min"


def wait_text(summary: dict[str, Any]) -> str:
    if not summary["n"]:
        return "none"
    return f"median {hours(summary['median_h'])} (IQR {hours(summary['q1_h'])} – {hours(summary['q3_h'])}; n={summary['n']})"


def summary_lines(doc: dict[str, Any], report: Path | None) -> list[str]:
    """What the terminal shows."""
    period = doc["period"]
    lines = [f"silent trial on {doc['fhir_server']}, AI reports issued from {period['since']}"
             f"{' until ' + period['until'] if period['until'] else ''}"]
    for task, t in doc["tasks"].items():
        s = t["studies"]
        sources = ", ".join(f"{n} {source}" for source, n in s["truth_from"].items())
        lines.append(f"{task}: {s['triaged']} studies triaged ({s['shadow']} shadow, {s['active']} active), "
                     f"{s['with_final_report']} with a final report; truth known for {s['truth_known']}"
                     f"{' (' + sources + ')' if sources else ''}, unknown for {s['truth_unknown']}")
        for label, figures in t["labels"].items():
            m = figures["metrics"]
            lines.append(f"  {label} [{figures['score']}]: {m['n']} studies ({m['positives']} positive, {m['negatives']} negative); "
                         f"AUC {ci_text(m['auc'])}")
            for name, point in operating_rows(figures)[:1 + len(m["at_thresholds"])]:
                threshold = "as recorded" if point["threshold"] is None else f"t={point['threshold']:.4f}"
                lines.append(f"    {name:<28} {threshold}  sensitivity {ci_text(point['sensitivity'], 2)}  specificity "
                             f"{ci_text(point['specificity'], 2)}  PPV {ci_text(point['ppv'], 2)}  NPV {ci_text(point['npv'], 2)}  "
                             f"raised {ci_text(point['raised'], 2)}")
        for mode, waits in t["turnaround"].items():
            words = {key: pair[1 if mode == "shadow" else 0] for key, pair in GROUPS.items()}
            lines.append(f"  {mode}: {words['positives_raised']} {waits['counts']['positives_raised']} of {waits['positives']} "
                         f"positives, waited {wait_text(waits['positives_raised'])}; {words['positives_missed']} "
                         f"{waits['counts']['positives_missed']}, waited {wait_text(waits['positives_missed'])}")
            lines.append(f"  {mode}: {words['raised']} {waits['counts']['raised']}, waited {wait_text(waits['raised'])}; "
                         f"{words['not_raised']} {waits['counts']['not_raised']}, waited {wait_text(waits['not_raised'])}")
        lines += [f"  warning: {w}" for w in t["warnings"]]
        if task in doc.get("site_thresholds", {}):
            written = doc["site_thresholds"][task]
            lines.append(f"  site threshold written to {written['file']}: {json.dumps(written['entry']['thresholds'])}")
    lines += [f"note: {line}" for line in doc["problem_lines"]]
    lines.append(f"feedback: {doc['feedback']}")
    if report:
        lines.append(f"report: {report}")
    return lines


def _listing(items: list[Any]) -> str:
    e = html.escape
    shown = "".join(f"<li>{e(json.dumps(x) if isinstance(x, dict) else str(x))}</li>" for x in items[:LISTED])
    more = f"<li>… and {len(items) - LISTED} more (all in --json)</li>" if len(items) > LISTED else ""
    return f"<ul>{shown}{more}</ul>"


def _label_section(task: str, label: str, figures: dict[str, Any]) -> list[str]:
    e = html.escape
    m = figures["metrics"]
    parts = [f"<h3 id='{e(task)}-{e(label)}'>{e(label)} <small>(score {e(figures['score'])})</small></h3>",
             f"<p>{m['n']} studies with a known truth: {m['positives']} positive, {m['negatives']} negative. "
             f"AUC {e(ci_text(m['auc']))} ({e(m['auc']['interval'])}).</p>",
             operating_table(operating_rows(figures)),
             "<details><summary>the studies in each cell (for review of the misses)</summary><table>"
             "<tr><th>threshold</th><th>true positive</th><th>false positive</th><th>false negative (missed)</th>"
             "<th>true negative</th></tr>"]
    for name, cell in figures["cells"].items():
        parts.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{e(', '.join(cell[k])) or '–'}</td>" for k in ("tp", "fp", "fn", "tn"))
                     + "</tr>")
    parts.append("</table></details>")
    return parts


def _turnaround_section(turnaround: dict[str, Any]) -> list[str]:
    e = html.escape
    if not turnaround:
        return []
    parts = ["<h3>What triage changed for the patients: order to final report</h3>",
             "<p>Hours from the order's <code>authoredOn</code> (else the study's <code>started</code>) to the "
             "radiologist's final report's <code>issued</code>: median, interquartile range, count. In shadow mode "
             "nobody saw the AI's call: the figures say how long the studies it would have raised waited.</p>",
             "<table><tr><th>mode</th><th>group</th><th>studies</th><th>median</th><th>IQR</th><th>study ids</th></tr>"]
    for mode, waits in turnaround.items():
        for key, pair in GROUPS.items():
            summary, count = waits[key], waits["counts"][key]
            timed = "" if summary["n"] == count else f" ({summary['n']} with a final report)"
            parts.append(f"<tr><td>{e(mode)}</td><td>{e(pair[1 if mode == 'shadow' else 0])}</td><td>{count}{timed}</td>"
                         f"<td>{hours(summary['median_h'])}</td><td>{hours(summary['q1_h'])} – {hours(summary['q3_h'])}</td>"
                         f"<td>{e(', '.join(summary['studies']))}</td></tr>")
    parts.append("</table>")
    for mode, waits in turnaround.items():
        if waits["without_start_time"]:
            parts.append(f"<p>{e(mode)}: no order time and no study start for {e(', '.join(waits['without_start_time']))}.</p>")
    return parts


def html_report(doc: dict[str, Any]) -> str:
    """One self-contained HTML page: per task the figures, the cells, the plots, the waits, every study."""
    e = html.escape
    period = doc["period"]
    parts = [page_head("Silent trial", ".raised{font-weight:bold}"),
             "<h1>Silent trial: the AI against the radiologists' final reports</h1>",
             f"<p>AI reports issued from {e(period['since'])}{' until ' + e(period['until']) if period['until'] else ''} on "
             f"<code>{e(doc['fhir_server'])}</code>, read {e(doc['created'])}. Truth from each study's final report "
             f"(<code>conclusionCode</code>, code map: {e(doc['code_map'])}), else the clinicians' CDS Hooks feedback "
             f"({e(doc['feedback'])}), else unknown: never from free text.</p>",
             "<p><strong>AI-generated triage, preliminary, not a diagnosis.</strong> Every figure comes with its 95% interval: "
             "Wilson score intervals for proportions (with the count), a stratified bootstrap for the AUC, as in "
             "<code>cds-triage validate</code>. Thresholds chosen for a sensitivity on these same studies reach it by "
             "construction: read the specificity beside them.</p>"]
    if doc["problem_lines"]:
        parts.append("<div class='warning' id='problems'><strong>About the data</strong><ul>"
                     + "".join(f"<li>{e(line)}</li>" for line in doc["problem_lines"]) + "</ul></div>")
    for task, t in doc["tasks"].items():
        s = t["studies"]
        parts.append(f"<h2 id='{e(task)}'>{e(task)}</h2>")
        models = "; ".join(f"{m['name']} {m['version']} ({m['studies']})" if m["name"] else f"unknown model ({m['studies']})"
                           for m in t["models"])
        parts.append(f"<p>{s['triaged']} studies triaged ({s['shadow']} in shadow mode, {s['active']} active) by {e(models)}; "
                     f"{s['with_final_report']} have a final report. Truth known for {s['truth_known']} "
                     f"({e(', '.join(f'{n} from {k}' for k, n in s['truth_from'].items()) or 'none')}), unknown for "
                     f"{s['truth_unknown']}.</p>")
        if t["warnings"]:
            parts.append(f"<div class='warning' id='{e(task)}-warnings'><strong>Read this first</strong><ul>"
                         + "".join(f"<li>{e(w)}</li>" for w in t["warnings"]) + "</ul></div>")
        for label, figures in t["labels"].items():
            parts += _label_section(task, label, figures)
            if label == next(iter(t["labels"])):
                y = np.array([row["truth"] for row in figures["studies"]], dtype=bool)
                p = np.array([row["score"] for row in figures["studies"]], dtype=np.float64)
                svgs = decision_plots(y, p, figures["metrics"], operating_rows(figures)[1:])
                parts.append("<div class='plots'>" + "".join(
                    f"<figure id='{e(task)}-{key}-plot'>{svg}<figcaption>{caption}</figcaption></figure>"
                    for key, caption in (("roc", "ROC"), ("pr", "Precision-recall"), ("calibration", "Calibration"))
                    if (svg := svgs.get(key))) + "</div>")
        parts += _turnaround_section(t["turnaround"])
        if task in doc.get("site_thresholds", {}):
            written = doc["site_thresholds"][task]
            parts.append(f"<h3>Site threshold written</h3><p><code>{e(written['file'])}</code>: "
                         f"{e(json.dumps(written['entry']['thresholds']))} for sensitivity {written['entry']['target_sensitivity']} "
                         f"on {written['entry']['chosen_on']['n']} studies (set <code>CDS_SITE_THRESHOLDS={e(written['file'])}</code> "
                         f"and <code>CDS_TASK_MODES={e(task)}=active</code> to go live with it).</p>")
        if t["unknown"]:
            parts.append(f"<h3>Studies without a known truth ({len(t['unknown'])})</h3>"
                         + _listing([f"ImagingStudy/{u['study']}: {u['reason']}" for u in t["unknown"]]))
        parts.append(f"<h3>Every study</h3><details><summary>{len(t['study_rows'])} studies</summary><table>"
                     "<tr><th>study</th><th>mode</th><th>score</th><th>raised</th><th>truth</th><th>from</th>"
                     "<th>final report</th><th>wait</th></tr>"
                     + "".join(f"<tr><td>{e(r['study'])}</td><td>{e(r['mode'])}</td>"
                               f"<td>{'n/a' if r['score'] is None else format(r['score'], '.4f')}</td>"
                               f"<td{' class=raised' if r['raised'] else ''}>{'yes' if r['raised'] else 'no'}</td>"
                               f"<td>{'unknown' if r['truth'] is None else int(r['truth'])}</td><td>{e(r['truth_detail'])}</td>"
                               f"<td>{e(r['final_report'] or '–')}</td><td>{hours(r['turnaround_h'])}</td></tr>"
                               for r in t["study_rows"]) + "</table></details>")
    problems = doc["problems"]
    listed = [(key, title) for key, title in (
        ("final_without_study", "Final reports that name no study"),
        ("final_for_untriaged_study", "Final reports for studies we never triaged"),
        ("several_finals", "Studies with several final reports"),
        ("unknown_codes", "Codes the code map does not know"),
        ("several_ai_reports", "Studies with several AI reports"),
        ("ai_reports_without_task", "AI reports whose task cannot be told"),
        ("final_without_issued", "Final reports without an issued time")) if problems.get(key)]
    for key, title in listed:
        parts.append(f"<h2>{title} ({len(problems[key])})</h2>" + _listing(problems[key]))
    parts.append("<h2>Searches made</h2><details><summary>the FHIR searches behind these figures</summary><ul>"
                 + "".join(f"<li><code>{e(s['search'])}</code>: {s['resources']} resources in {s['pages']} pages</li>"
                           for s in doc["searches"]) + "</ul></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
