"""What talks to the world outside the process: the PACS (DICOMweb: pacs, and the heatmap as a
Secondary Capture: secondary_capture), the FHIR server (fhir_client, subscribe), SMART backend
authorization and inbound token checks (smart_auth, security), the audit trail and the Prometheus
metrics. Adapters use the core, never the web layer (tests/test_architecture.py)."""
