"""Stage 2: Ray Train workers, each a DeepSpeed engine on the policy, BCO loss on the precomputed columns."""
