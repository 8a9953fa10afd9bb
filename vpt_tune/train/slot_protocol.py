"""What a slot's workers (:mod:`vpt_tune.train.slot_worker`) and the search's slot pool
(:mod:`vpt_tune.search.slot_pool`) say to each other. No torch: the pool and the trial drivers import it."""

CLOSED = "closed"  # what the pool answers a worker once the search is over
SLOT = "slot"  # result key: the slot that trains the trial
SLOT_TRIAL = "slot_trial"  # result key: the how-manieth trial of its slot's worker process (1: it paid the start-up)
# A lease, what the pool hands a slot's workers otherwise, is {"trial": its Tune name, "config": as Tune sampled it,
# "started_at": when its driver handed it over (time.time()), "start_id": that hand-over's id}.
