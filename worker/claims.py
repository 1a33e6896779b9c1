"""Claims that name their job: "this job is doing X" kept in Redis.

A worker can be killed at any moment (OOM killer, deploy, node restart) and leave its claim
behind. A claim that only expired would block X until then, so each claim holds the id of
the RQ job that took it: RQ's retry of that job (the same id) takes it over at once, and so
does any other job once the holder has ended; a holder still queued or running is left alone.
"""

from __future__ import annotations

from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from outgoing.redis_conn import rq_connection

# Compare and set: of two jobs taking over the same claim, only one gets it.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
# Compare and delete: give a claim back only while it is still ours.
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_AT_WORK = {JobStatus.STARTED, JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


def current_job_id() -> str:
    """The id a claim of this process names ("-" outside an RQ job)."""
    job = get_current_job()
    return job.id if job is not None else "-"


def claim(redis, key: str, *, seconds: int, final: frozenset[str] = frozenset()) -> bool:
    """Claim ``key`` for the current job; False while another job at work holds it, or
    when it holds one of the ``final`` values (a claim's end state, such as "sent")."""
    mine = current_job_id()
    if redis.set(key, mine, nx=True, ex=seconds):
        return True
    holder = holder_of(redis, key)
    if holder is None:
        return bool(redis.set(key, mine, nx=True, ex=seconds))
    if holder in final:
        return False
    if holder != mine and at_work(redis, holder):
        return False
    return bool(redis.eval(_TAKE_OVER, 1, key, holder, mine, seconds))


def holder_of(redis, key: str) -> str | None:
    """What ``key`` holds: a job's id, a final value, or None when nobody claims it."""
    holder = redis.get(key)
    if holder is None:
        return None
    return holder.decode() if isinstance(holder, bytes) else str(holder)


def give_back(redis, key: str) -> None:
    """End the current job's claim of ``key`` (a claim taken over since stays)."""
    redis.eval(_GIVE_BACK, 1, key, current_job_id())


def at_work(redis, job_id: str) -> bool:
    """Whether RQ still has job ``job_id`` queued, scheduled, waiting or running."""
    try:
        status = Job.fetch(job_id, connection=rq_connection(redis)).get_status()
    except NoSuchJobError:
        return False
    return status in _AT_WORK
