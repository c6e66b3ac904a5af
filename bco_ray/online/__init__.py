"""Online BCO: rounds of generate → label → update (bco_ray/online/rounds.py), with their prompts (prompts.py),
labeler (labeler.py) and stored rows (store.py)."""
