"""Imported first by the corpus pool's fork server (a forkserver preload), for its side effect: the fork server,
and every worker it forks, ignore SIGTERM and SIGINT from the moment they exist.

A scheduler that signals the whole process group reaches the fork server too. Python's fork server dies of
SIGTERM, and the pool could then start no process (ConnectionRefusedError on the next one, the job's crash
retry included); a worker forked while the signal arrives would die before its initializer ignored it. Stopping
is the job process's decision (labram_jax.preemption); the fork server exits when the job does.
"""
from labram_jax.preemption import ignore_in_worker

ignore_in_worker()
