"""The BCO math: plain torch / scikit-learn, no Ray. Unit-tested against hand-computed numbers.

Modules: `loss` (BCO loss, running δ), `udm` (the density-ratio classifier and weights), `logprobs` (summed
completion log-probs; its head in `head_logps`, its forwards in `forwards`, packed attention in
`packed_attention`), `liger` (the optional Liger Kernel head). Nothing is imported here, so a Ray Data task that
needs only `udm` (scikit-learn) does not import torch and transformers with it."""
