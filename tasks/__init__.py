"""The steps of our pipelines, in three layers that import downwards only (checked by `make lint`):

- `tasks.steps`: the framework: step kinds, `@pipeline`, cache, retry, references and their
  adapters, lineage, compute (Dask), settings, errors, tag and event names. No domain module.
- `tasks.tabular`: the tabular pipeline's domain (data, features, training, registry).
- `tasks.monitoring`: the monitoring domain (baseline, drift, performance, policies, backtest).

Nothing here imports `flows` or `deployments`, and importing any module never reads settings or
connects to a server.
"""
