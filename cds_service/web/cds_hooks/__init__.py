"""CDS Hooks 2.0: discovery, four services and feedback, behind the JWT check of adapters/security.py.

| service | hook | answers with |
|---|---|---|
| `imagingstudy-create` | imagingstudy-create | queues triage; an "analysis pending" card at once (never waits for inference), or the result card when the job already finished |
| `patient-view` | patient-view | one card per AI result of this patient from the FHIR server, newest first |
| `order-select`, `order-sign` | order-select / order-sign | a critical card when an imaging order is drafted for a patient with an unread critical AI finding |

Data: prefetched resources when the client sent them; otherwise we read them from the
client's `fhirServer` with its `fhirAuthorization` token (never with our own system
credentials: the clinician's access rules must apply); with neither we answer 412.
Every call is checked (JWT, rate limit, JSON depth) in `guard_hook_call` before a handler runs,
and recorded in the audit log (adapters/audit.py) with the cards we returned.

In four modules: `cards` builds the cards from AI results and says what an imaging order is (pure;
the worklist uses it too), `calls` parses a request and a feedback (pure), `services` holds the four
services (their data, handlers and registry), `routes` is the HTTP shell (the guard, the routes,
`register_cds_hooks`).
"""
