"""Stage 1: the Ray Data pass (tokenize → reference log-probs → prompt embeddings → UDM weights), cached."""
