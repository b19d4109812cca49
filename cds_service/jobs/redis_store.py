"""`RedisJobStore`: jobs in Redis, shared by every machine (CDS_QUEUE_URL=redis://…)."""

from __future__ import annotations

import builtins
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence


from cds_service.core.errors import QueueUnavailableError

from .state import BaseJobStore, job_from_row, job_to_row, Job, JobState, RECENT_TRIAGES_KEPT

log = logging.getLogger(__name__)

class RedisJobStore(BaseJobStore):
    """Jobs in Redis, shared by the web services and workers of several machines.

    A job is a hash; sorted sets index it by creation time (all, per state), by lease
    (unfinished jobs), a done job by finishing time per task (the latest RECENT_TRIAGES_KEPT)
    and a set by ImagingStudy. Each change is an optimistic transaction
    (WATCH the job's key, compute with the pure functions above, MULTI/EXEC; retried when
    another client changed it in between), so two workers never both claim a job.
    """

    def __init__(self, url: str, *, prefix: str = "cds-triage:", timeout_s: float = 10.0, **options: float) -> None:
        import redis

        super().__init__(**options)
        self.url = url
        self.prefix = prefix
        self._errors = (redis.RedisError,)
        # Any: redis-py's annotations cannot say that decode_responses=True answers str, never bytes, nor
        # that transaction(value_from_callable=True) returns what the callable returns
        self.redis: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               decode_responses=True, health_check_interval=30)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise QueueUnavailableError(f"job store at Redis unavailable: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _decode(raw: dict[str, str]) -> Job | None:
        return job_from_row(raw) if raw else None

    def _write(self, pipe: Any, before: Job | None, after: Job) -> None:
        """Queue (inside MULTI) the writes that store `after` and keep the indexes right."""
        pipe.hset(self._key("job", after.id), mapping={k: ("" if v is None else v) for k, v in job_to_row(after).items()})
        if before is None:
            pipe.zadd(self._key("jobs"), {after.id: after.created_at})
            pipe.sadd(self._key("study", after.imaging_study_id), after.id)
        if before is None or before.state is not after.state:
            if before is not None:
                pipe.zrem(self._key("state", before.state.value), after.id)
            pipe.zadd(self._key("state", after.state.value), {after.id: after.created_at})
        if after.state.finished:
            pipe.zrem(self._key("leases"), after.id)
        else:
            pipe.zadd(self._key("leases"), {after.id: after.lease_until})
        task = after.result.get("task") if after.state is JobState.DONE else None
        was = before.result.get("task") if before is not None and before.state is JobState.DONE else None
        if was and was != task:
            pipe.zrem(self._key("triaged", str(was)), after.id)
        if task:
            pipe.zadd(self._key("triaged", str(task)), {after.id: after.updated_at})
            pipe.zremrangebyrank(self._key("triaged", str(task)), 0, -RECENT_TRIAGES_KEPT - 1)

    def _submit(self, key: str, create: Callable[[], Job], on_existing: Callable[[Job], Job | None]) -> tuple[Job, bool]:
        dedup = self._key("dedup", key)

        def attempt(pipe: Any) -> tuple[Job, bool]:
            existing_id = pipe.get(dedup)
            if existing_id is None:
                job = create()
                pipe.multi()
                pipe.set(dedup, job.id)
                self._write(pipe, None, job)
                return job, True
            pipe.watch(self._key("job", existing_id))
            existing = self._decode(pipe.hgetall(self._key("job", existing_id)))
            if existing is None:
                raise QueueUnavailableError(f"job store inconsistent: {dedup} names a missing job")
            changed = on_existing(existing)
            pipe.multi()
            if changed is None:
                return existing, False
            self._write(pipe, existing, changed)
            return changed, True

        with self._guard():
            return self.redis.transaction(attempt, dedup, value_from_callable=True)

    def _update(self, job_id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        key = self._key("job", job_id)

        def attempt(pipe: Any) -> tuple[Job | None, Job | None]:
            before = self._decode(pipe.hgetall(key))
            after = change(before) if before is not None else None
            pipe.multi()
            if after is not None:
                self._write(pipe, before, after)
            return before, after

        with self._guard():
            return self.redis.transaction(attempt, key, value_from_callable=True)

    def _many(self, ids: builtins.list[str]) -> builtins.list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id))
        return [job for job in map(self._decode, pipe.execute()) if job is not None]

    def get(self, job_id: str) -> Job | None:
        with self._guard():
            return self._decode(self.redis.hgetall(self._key("job", job_id)))

    def list(self, *, imaging_study_id: str | None = None, state: str | None = None, limit: int = 100) -> builtins.list[Job]:
        with self._guard():
            if imaging_study_id:
                jobs = self._many(sorted(self.redis.smembers(self._key("study", imaging_study_id))))
                jobs = [j for j in jobs if not state or j.state.value == state]
                return sorted(jobs, key=lambda j: j.created_at, reverse=True)[:limit]
            index = self._key("state", state) if state else self._key("jobs")
            return self._many(self.redis.zrevrange(index, 0, limit - 1))

    def counts(self) -> dict[str, int]:
        with self._guard():
            pipe = self.redis.pipeline(transaction=False)
            for state in JobState:
                pipe.zcard(self._key("state", state.value))
            return {state.value: int(n) for state, n in zip(JobState, pipe.execute())}

    def lapsed(self, now: float, limit: int = 100) -> builtins.list[str]:
        with self._guard():
            return list(self.redis.zrangebyscore(self._key("leases"), "-inf", f"({now}", start=0, num=limit))

    def heartbeat(self, worker: str, now: float) -> None:
        with self._guard():
            self.redis.zadd(self._key("workers"), {worker: now})

    def live_workers(self, since: float) -> builtins.list[str]:
        with self._guard():
            return sorted(self.redis.zrangebyscore(self._key("workers"), since, "+inf"))

    def ping(self) -> None:
        with self._guard():
            self.redis.ping()

    def recent_triages(self, task: str, limit: int) -> Sequence[Job]:
        with self._guard():
            jobs = self._many([str(i) for i in self.redis.zrevrange(self._key("triaged", task), 0, limit - 1)])
        return [job for job in jobs if job.state is JobState.DONE]

    def swap_flag(self, name: str, value: str) -> str | None:
        with self._guard():
            before = self.redis.getset(self._key("flag", name), value)
        return None if before is None else str(before)
