"""Development tools, outside the runtime path: the local Orthanc and FHIR servers and the DICOM
test-data factory (devservers), `cds-triage demo` (demo, imported by the CLI only when asked) and
the sample studies' builder (build_samples). The tests and bench/ use them; the service does not."""
