"""The monitoring domain: the baseline stored with a model version, drift statistics and their
calibration, performance, retrain policies and verdicts, the reports (the one Evidently adapter),
monitoring history, the retrain lock, and the backtest that replays policies on history.

Built on the tabular domain (features, predictions) and the framework (`tasks.steps`).
"""
