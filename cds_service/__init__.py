"""Radiology triage for the EHR: a FHIR-integrated CDS service (see README.md)."""

import os

# OpenMP threads (torch's intra-op pool) spin while waiting for work by default. On a small
# machine that also runs the web service, the PACS or the FHIR server, a spinning thread that
# loses its core stalls the whole batch: measured on 2 cores, a 1-image triage took 5 s
# instead of 0.4 s. Passive waiting costs little when the cores are free. Set before torch
# is imported (it is imported lazily); an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
