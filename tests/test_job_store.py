"""The job store's guarantees, on both backends (SQLite file and a real Redis).

What a crash-safe queue needs: one job per study and model set however many triggers race,
one worker per job however many claim it, a killed worker's job recovered when its lease
lapses (its late result refused), a bounded number of attempts, then the dead-letter state.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from cds_service.jobs.state import JobState, TriageRequest
from cds_service.jobs.sqlite_store import JobStore
from cds_service.core.errors import QueueUnavailableError
from cds_service.jobs.redis_store import RedisJobStore
from redis_support import start_redis


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    options = {"redeliver_s": 60.0, "lease_s": 30.0}
    if request.param == "sqlite":
        return JobStore(tmp_path / "jobs.sqlite3", **options)
    url = request.getfixturevalue("redis_url")
    return RedisJobStore(url, prefix=f"test-{tmp_path.name}:", **options)


def race(count: int, action):
    """Run `action(i)` in `count` threads at once; their results."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = action(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_racing_triggers_make_one_job(store):
    results = race(8, lambda i: store.submit(TriageRequest("race", "subscription" if i % 2 else "cds-hooks"), "m@1"))
    assert len({job.id for job, _ in results}) == 1
    assert sum(queued for _, queued in results) == 1
    assert store.counts()["queued"] == 1 and len(store.list(imaging_study_id="race")) == 1


def test_racing_workers_claim_a_job_once(store):
    job, _ = store.submit(TriageRequest("s1", "subscription"), "m@1")
    claims = race(8, lambda i: store.claim(job.id, f"worker-{i}"))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1 and winners[0].attempts == 1 and winners[0].state is JobState.RUNNING
    assert store.get(job.id).worker == winners[0].worker


def test_a_killed_workers_job_is_recovered_and_its_late_result_refused(store):
    job, _ = store.submit(TriageRequest("s2", "subscription"), "m@1")
    store.claim(job.id, "w1", lease_s=0.3)
    assert store.recover(max_attempts=3) == []  # lease still valid
    assert store.renew(job.id, "w1", lease_s=0.3) and not store.renew(job.id, "w2", lease_s=0.3)
    time.sleep(0.4)
    [recovered] = store.recover(max_attempts=3)
    assert recovered.id == job.id and recovered.state is JobState.QUEUED and "w1 stopped" in recovered.reason
    assert store.recover(max_attempts=3) == []  # recovered once, not by every worker that looks
    again = store.claim(job.id, "w2")
    assert again.attempts == 2 and again.worker == "w2"
    assert not store.finish(job.id, JobState.DONE, worker="w1")  # w1 was only slow: its result is refused
    assert store.finish(job.id, JobState.DONE, result={"task": "head_ct_ich"}, worker="w2")
    done = store.get(job.id)
    assert done.state is JobState.DONE and done.result == {"task": "head_ct_ich"} and done.lease_until == 0


def test_a_job_that_keeps_killing_workers_ends_dead_lettered(store):
    job, _ = store.submit(TriageRequest("poison", "subscription"), "m@1")
    for attempt in (1, 2):
        claimed = store.claim(job.id, f"w{attempt}", lease_s=0.1)
        assert claimed.attempts == attempt
        time.sleep(0.15)
        store.recover(max_attempts=2)
    dead = store.get(job.id)
    assert dead.state is JobState.FAILED and dead.reason.startswith("gave up after 2 attempts")
    assert store.list(state="failed")[0].id == job.id
    # An operator re-queues the dead letter: fresh attempts.
    requeued = store.requeue(job.id)
    assert requeued.state is JobState.QUEUED and requeued.attempts == 0 and requeued.reason == ""


def test_a_lost_queue_message_is_delivered_again(store):
    store.redeliver_s = 0.2
    job, _ = store.submit(TriageRequest("lost", "subscription"), "m@1")
    assert store.recover(max_attempts=3) == []
    time.sleep(0.3)
    [again] = store.recover(max_attempts=3)
    assert again.id == job.id and again.state is JobState.QUEUED and again.attempts == 0
    store.claim(job.id, "w1")
    assert store.schedule_retry(job.id, "PACS down", delay_s=0.1, worker="w1")
    assert store.get(job.id).state is JobState.RETRYING
    time.sleep(0.4)  # the scheduled retry never came (its message was lost with the queue)
    [retry] = store.recover(max_attempts=3)
    assert retry.state is JobState.RETRYING and store.claim(job.id, "w2").attempts == 2


def test_requeue_leaves_a_live_workers_job_alone_and_keeps_attempts_of_done_jobs(store):
    job, _ = store.submit(TriageRequest("rq", "subscription"), "m@1")
    store.claim(job.id, "w1", lease_s=30)
    assert store.requeue(job.id).state is JobState.RUNNING
    store.finish(job.id, JobState.DONE, worker="w1")
    rerun = store.requeue(job.id)
    assert rerun.state is JobState.QUEUED and rerun.attempts == 1 and rerun.queued_at >= job.queued_at
    assert store.requeue("no-such-job") is None


def test_failed_job_is_resubmitted_by_a_new_trigger_but_done_is_not(store):
    job, _ = store.submit(TriageRequest("rs", "subscription"), "m@1")
    store.claim(job.id, "w1")
    store.finish(job.id, JobState.FAILED, "PACS down", worker="w1")
    again, queued = store.submit(TriageRequest("rs", "cds-hooks", service_request_id="sr1"), "m@1")
    assert queued and again.id == job.id and again.attempts == 0 and again.service_request_id == "sr1"
    store.claim(job.id, "w1")
    store.finish(job.id, JobState.DONE, worker="w1")
    assert store.submit(TriageRequest("rs", "subscription"), "m@1")[1] is False
    assert store.submit(TriageRequest("rs", "subscription"), "m@2")[1] is True  # new model version: new job


def test_counts_and_live_workers(store):
    for i in range(3):
        store.submit(TriageRequest(f"c{i}", "subscription"), "m@1")
    first = store.list(limit=1)[0]
    store.claim(first.id, "w1")
    counts = store.counts()
    assert counts["queued"] == 2 and counts["running"] == 1 and set(counts) == {s.value for s in JobState}
    now = time.time()
    store.heartbeat("w1", now - 100)
    store.heartbeat("w2", now)
    assert store.live_workers(now - 10) == ["w2"]


def test_redis_down_is_a_transient_error(tmp_path):
    proc = start_redis(tmp_path / "redis")
    store = RedisJobStore(proc.url, timeout_s=1)
    store.submit(TriageRequest("x", "subscription"), "m@1")
    proc.stop()
    with pytest.raises(QueueUnavailableError):
        store.submit(TriageRequest("y", "subscription"), "m@1")
    with pytest.raises(QueueUnavailableError):
        store.ping()


def test_a_job_file_from_the_earlier_version_is_migrated_and_its_running_job_recovered(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, dedup_key TEXT NOT NULL UNIQUE, imaging_study_id TEXT NOT NULL,
              service_request_id TEXT, source TEXT NOT NULL, model_set TEXT NOT NULL, state TEXT NOT NULL,
              reason TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
              updated_at REAL NOT NULL, result TEXT NOT NULL DEFAULT '{}');
            INSERT INTO jobs (id, dedup_key, imaging_study_id, source, model_set, state, attempts, created_at, updated_at)
              VALUES ('old', 's|m@1', 's', 'subscription', 'm@1', 'running', 1, 1.0, 1.0);
        """)
    store = JobStore(path)
    [recovered] = store.recover(max_attempts=3)
    assert recovered.id == "old" and recovered.state is JobState.QUEUED
