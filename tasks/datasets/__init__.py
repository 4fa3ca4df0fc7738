"""Tasks read from data sets a user has locally: RULER and LongBench JSONL, kvpress-style rows and Hugging
Face datasets in their official schema.
"""
