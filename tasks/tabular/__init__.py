"""The tabular pipeline's domain: reading and pinning data, its quality constraints, features,
the split, LightGBM tuning and training, evaluation, the served model, and registration.

Built on the framework (`tasks.steps`); imports nothing from `tasks.monitoring`.
"""
