"""Periodic jobs with nothing but ``rq worker --with-scheduler``: each run schedules the next,
and whoever ensures the chain cannot start a second one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from rq import Queue
from rq.job import Job

from outgoing import jobs
from tests.support import worker


def scheduled(redis_client) -> dict[str, datetime]:
    registry = Queue("outgoing", connection=redis_client).scheduled_job_registry
    return {job_id: registry.get_scheduled_time(job_id) for job_id in registry.get_job_ids()}


def test_ensuring_twice_schedules_each_periodic_job_once(instance, redis_client):
    now = datetime(2026, 11, 29, 10, 7, 30, tzinfo=UTC)
    first = jobs.ensure_periodic(redis_client, now=now)
    assert jobs.ensure_periodic(redis_client, now=now) == []
    assert sorted(first) == sorted(scheduled(redis_client))
    times = scheduled(redis_client)
    assert times[jobs.periodic_job_id("sweep-locks", datetime(2026, 11, 29, 10, 5,
                                                              tzinfo=UTC))]
    report = jobs.periodic_job_id("quarantine-report", datetime(2026, 11, 30, 6, 0, tzinfo=UTC))
    assert times[report] == datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


def test_sweep_runs_at_worker_start_and_schedules_its_next_run(instance, redis_client, sink):
    now = datetime.now(UTC)
    jobs.ensure_periodic(redis_client, now=now)
    current = jobs.periodic_job_id("sweep-locks", jobs.period_start("sweep-locks", now))

    before = datetime.now(UTC)
    worker.burst(sink)
    after = datetime.now(UTC)

    assert Job.fetch(current, connection=redis_client).get_status() == "finished"
    upcoming = scheduled(redis_client)
    # The run schedules the period after the one it ran in; a period may end during the run.
    following = {jobs.periodic_job_id("sweep-locks", jobs.next_due("sweep-locks", at))
                 for at in (before, after)}
    assert following & set(upcoming)
    # Ensuring again (the proxy starts) finds the chain and adds nothing.
    assert [j for j in jobs.ensure_periodic(redis_client) if "sweep" in j] == []


def test_a_chain_whose_run_crossed_a_period_boundary_is_not_started_again(redis_client):
    """The run of one period ran after the next began and scheduled the period after that:
    the chain is there, so ensuring it (a proxy or worker starting) adds no second run."""
    boundary = jobs.next_due("sweep-locks", datetime.now(UTC))
    jobs.schedule_periodic(redis_client, "sweep-locks",
                           jobs.next_due("sweep-locks", boundary + timedelta(seconds=1)))
    assert [j for j in jobs.ensure_periodic(redis_client, now=boundary + timedelta(seconds=2))
            if "sweep" in j] == []


def test_naive_utc_times_are_scheduled_as_utc(instance, redis_client):
    at = datetime(2030, 1, 1, 12, 0)
    job = jobs.enqueue(redis_client, "worker.jobs.sweep_expired_locks", at=at)
    registry = Queue("outgoing", connection=redis_client).scheduled_job_registry
    assert registry.get_scheduled_time(job.id) == at.replace(tzinfo=UTC)
