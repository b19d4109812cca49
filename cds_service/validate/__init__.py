"""`cds-triage validate --task T --labels L.csv PATHS…`: a site measures a model on its own labelled studies.

The studies are scored exactly as `cds-triage triage` scores them (`local_triage.collect_inputs` and
`triage_input`: the same preprocessing, the same model and the same series pooling as the service), so
the numbers are the service's numbers. One decision per study is measured: `any` for head CT,
`pneumothorax` for chest X-ray, tumour present (1 - p(no_tumor)) for brain MRI. The report gives the AUC
with its interval, sensitivity / specificity / PPV at the card's threshold (and at the site threshold in
use, if any) and at the thresholds that reach sensitivity 0.90 / 0.95 / 0.98 on this set, calibration,
head CT subtypes where the labels have them, and says when the set is too small to say much.
`--write-thresholds FILE` writes the site threshold file the service then uses (site_thresholds.py).

Labels CSV: a `file` column (an image or DICOM file, relative to the CSV's folder) or a `study` column
(a folder relative to the CSV's folder, a folder name, or a Study/Series Instance UID), and a `label`
column (0/1; brain MRI also takes the class name; the task's main label, `any` or `pneumothorax`, may
stand for `label`); head CT subtype columns (`epidural`, …) are optional. A folder of images named by
`study` is one series: its slices are scored one by one and pooled in file-name order as the card says.

In three modules: `labels` reads the labels CSV and matches its rows with the inputs, `report` writes
the summary and the HTML report, `command` scores the studies, measures them and runs the command.
"""
