"""What several methods share: selecting kept tokens per KV head (`eviction`), the tokens a budget leaves once a
method's decode state is paid (`budget`), the token scorers that per-head budget methods build on (`scorers`),
calibrated per-head scores (`head_scores`), decode-time query logs (`query_log`) and the offline calibration text
(`calibration_data`). Not methods: nothing here registers.
"""
