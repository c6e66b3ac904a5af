"""Generation eval: completions of held-out prompts from the reference and the policy, scored by a verifier
and by the policy's implicit reward (bco_ray/eval/generation.py: plain torch; bco_ray/eval/pipeline.py: the Ray
Data pass; bco_ray/eval/report.py: metrics, tables, MLflow)."""
