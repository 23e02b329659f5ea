"""Analysis: what the results records say (metrics, statistics and verdicts, tables, figures, the report).

Modules here read records and arrays; they never train.
"""
