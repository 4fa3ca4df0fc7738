"""Sweeps: tasks × lengths × samples × methods × budgets (`sweep`), the resumable result store every row is
appended to (`store`), and the same work units on Ray actors (`ray_runner`).
"""
