"""Small tasks of the project's own, generated deterministically by code, with a scorer.

`orders`: free-text shop orders -> one canonical JSON object (the quickstart task).
"""
