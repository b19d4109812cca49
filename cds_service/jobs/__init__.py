"""Jobs: a durable record of every triage request, and the queue that runs them.

Four modules:
- `state`: the job's life as pure functions over a small `Job` dataclass (`claimed`, `finished`,
  `recovered`, …): the rules for what may happen to a job live there, once;
- a store that applies them atomically: `sqlite_store.JobStore` (one SQLite file, the default for one
  box) or `redis_store.RedisJobStore` (shared by every machine, chosen with CDS_QUEUE_URL=redis://…).
  It is what `/jobs/<id>` shows and what de-duplicates: one job per (ImagingStudy, model set);
- `queue`: `create_queue` / `register_triage_task`, a `huey` queue carrying job ids to the workers.

Delivery is at-least-once, effects exactly once:
- a job is *claimed* atomically (queued → running) before it runs, so a job id delivered
  twice (a re-sent notification, a recovered worker) runs once at a time;
- a running job holds a *lease* that its worker renews; when a worker dies (SIGKILL, power
  loss) the lease lapses and any worker puts the job back on the queue (`recovered`). The
  killed attempt counts, so a study that kills workers ends `failed` instead of looping;
- a queued job that nobody claims within CDS_JOB_REDELIVER_S is queued again (a queue
  message lost with a crashed process); a duplicate message finds the job claimed and stops;
- the FHIR write-back is idempotent (conditional creates, If-Match), so running twice writes once.

`failed` is the dead-letter state: a permanent error, or transient ones for every attempt
allowed. Its `reason` says which; an operator re-queues it (CLI or HTTP) with fresh attempts.
"""
