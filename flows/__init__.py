"""Prefect flows users run: the training pipeline (`python -m flows.pipeline`) and retraining
(`python -m flows.retrain`)."""
