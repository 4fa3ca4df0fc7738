"""Tasks generated offline from a seed (RULER-style needles, variable tracking, word extraction, passkey,
reconstruction, perplexity): their generators, haystacks, word pools, prompt templates, the fitting of a
sample to a target length in the model's tokens, and the disk cache of fitted samples.
"""
