"""What several methods share: selecting kept tokens per KV head (`eviction`), the token scorers that per-head
budget methods build on (`scorers`), calibrated per-head scores (`head_scores`), decode-time query logs
(`query_log`) and the offline calibration text (`calibration_data`). Not methods: nothing here registers.
"""
