"""Backends, not forks: work that runs in this process or on a Ray cluster through one interface.

* :mod:`pamarl.distributed.pool` -- a pool of stateful workers (the averaging DQN's learners, rollout env
  workers): :class:`~pamarl.distributed.pool.LocalPool` in this process, ``RayPool`` as Ray actors.
* :mod:`pamarl.distributed.ray_env` -- env copies stepped by Ray actors (``env_backend=ray``).
* :mod:`pamarl.distributed.rollout` -- rollout workers of the on-policy family (``rollout_workers=W``): env
  copies and a policy copy per worker, one rollout message per iteration, in this process or on Ray actors.
* :mod:`pamarl.distributed.launch` -- how ``pamarl compare`` runs its jobs: subprocesses or Ray tasks.

Nothing here imports Ray at module import time; ``import pamarl`` never needs it.
"""
