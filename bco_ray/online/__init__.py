"""Online BCO: rounds of generate → label → update (bco_ray/online/rounds.py), with their prompts (prompts.py),
labeler (labeler.py) and stored rows (store.py); in a job, the rollout that generates and scores (rollout.py, behind
the generation backend seam of generate.py) and the channel to the training workers (channel.py)."""
