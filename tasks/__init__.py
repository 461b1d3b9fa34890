"""Step kinds (processing, training, tuning, condition, model, fail) and the domain steps built on them.

Nothing here imports `flows` or `deployments`, and importing any module never reads settings or
connects to a server.
"""
