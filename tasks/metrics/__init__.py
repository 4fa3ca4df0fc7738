"""Per-sample metrics: the string matches of RULER and passkey (`scoring`, which also holds the registry
`METRICS`) and the generation-quality scorers ROUGE and BERTScore (`quality`).
"""
