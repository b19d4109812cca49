"""`cds-triage trial --since DATE [--task T]`: the silent trial, from the FHIR server alone.

In shadow mode the evidence a site needs before a task goes active is already in the EHR: our
preliminary AI reports and, days later, the radiologists' final reports of the same studies. The
trial reads both for a period, takes the truth of each study from its final report's codes (else
the clinicians' CDS Hooks feedback, else unknown: never from free text), measures each task and
label with the statistics of `cds-triage validate` (same code, same intervals), lists the studies in
each cell so a radiologist can review the misses, says how long the studies triage raised (or, in
shadow mode, would have raised) waited for their final report against those it did not, and can
write the site threshold file the service then decides with (`--write-thresholds`, validate's format).

In six modules: `fhir_reads` (the adapter side: the FHIR searches, paged, and the audit log's
feedback), `truth` (the code map and the rules that make codes and feedback truth), `studies` (each
triaged study with its final report, truth and times, and the data's problems), `figures` (the
statistics and the turnaround), `report` (the summary and the HTML page) and `command` (the CLI).
"""
