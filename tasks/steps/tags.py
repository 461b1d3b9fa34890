"""Every name we write into MLflow (run tags, model-version tags, the alias) and every Prefect event
name, defined once. Code that writes or reads one imports it from here; tests spell the strings out,
because they are what users search by in the MLflow and Prefect UIs.
"""

# --- MLflow's and Prefect's own names, which their UIs read -------------------------------------------
PARENT_TAG = "mlflow.parentRunId"  # a step run's execution run: the MLflow UI nests by it
SOURCE_NAME_TAG = "mlflow.source.name"  # the pipeline file
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # of the pipeline file's repository
# What MLflow's UI reads to tell a model-training experiment from a GenAI one (without it, it infers
# the kind, and showed ours with traces and token usage, the step runs under "Evaluation runs").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # on a dataset input: train, valid, test, raw, ...
FLOW_RUN_ID_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
FLOW_RUN_URL_TAG = "prefect.flow_run_url"  # only when there is a server to link to
TASK_RUN_ID_TAG = "prefect.task_run_id"

# --- an execution (the parent run) -------------------------------------------------------------------
PIPELINE_TAG = "keel.pipeline"
# the names of the pipelines other code finds by that tag
SCORING_PIPELINE = "batch-transform"  # flows.transform
MONITOR_PIPELINE = "drift-monitor"  # flows.monitor
QUALITY_PIPELINE = "model-quality"  # flows.label
GIT_DIRTY_TAG = "keel.git_dirty"
HOST_TAG = "keel.host"  # with PID_TAG: whose process runs it, to end runs of dead executions
PID_TAG = "keel.pid"
REUSED_FROM_TAG = "keel.reused_from"  # resume: the execution whose step outputs this one reuses
SELECTED_STEPS_TAG = "keel.selected_steps"
FORCED_STEPS_TAG = "keel.forced_steps"
EXECUTION_REASON_TAG = "keel.reason"  # why it ran (a retrain's drift reasons, a person's note)
TRIGGER_TAG_PREFIX = "keel.trigger."  # what started it: flow, event_id, drift_report
REJECTED_FILE_TAG = "keel.rejected.file"  # the input a data check refused, and where
REJECTED_COLUMN_TAG = "keel.rejected.column"
REJECTED_RULE_TAG = "keel.rejected.rule"
REJECTED_RECORD_TAG = "keel.rejected.record"

# --- a step (a child run) ---------------------------------------------------------------------------
STEP_TAG = "keel.step"
STEP_KIND_TAG = "keel.step_kind"
ERROR_TAG = "keel.error"  # on failed runs: the exception, shortened
ATTEMPTS_TAG = "keel.attempts"
KEY_TAG = "keel.cache.key"
STATUS_TAG = "keel.cache.status"  # hit, reused, miss, rerun, forced, off (see Step._reusable)
PRODUCED_TAG = "keel.cache.produced"  # "true" on runs whose function ran and finished
SOURCE_RUN_TAG = "keel.cache.source_run_id"  # a hit: the run whose outputs it returned
SOURCE_EXECUTION_TAG = "keel.cache.source_execution"
REASON_TAG = "keel.cache.reason"  # why it was a hit or a miss, in words
OUTCOME_TAG = "keel.outcome"  # a condition step's outcome and its message
OUTCOME_MESSAGE_TAG = "keel.outcome_message"
FAIL_MESSAGE_TAG = "keel.fail_message"
BEST_TRIAL_RUN_TAG = "keel.best_trial_run_id"  # a tuning step's best trial (a child run)
REGISTERED_VERSION_TAG = "keel.registered_version"  # a model step's run: the version it registered
CHAMPION_VERSION_TAG = "keel.champion_version"  # an evaluation's run: the champion it compared with
QUALITY_AGAINST_TAG = "keel.quality.against"  # a data-quality check's run: what it checked against
QUALITY_VIOLATIONS_TAG = "keel.quality.violations"

# --- a model, on the run that logged it and on its registered versions -------------------------------
MODEL_DIGEST_TAG = "model.digest"  # ModelRef.digest
MANIFEST_TAG = "keel.model_files"  # the digest of each file of the logged model (integrity)

# --- a registered model version (what code reads back; people read its model card) -------------------
CHAMPION_ALIAS = "champion"
APPROVAL_TAG = "approval_status"
METRIC_TAG_PREFIX = "metric."  # its metrics, to sort and filter versions by
COMPARED_WITH_TAG = "compared_with"  # the champion version it was judged against
BASELINE_TAG = "baseline.uri"  # where its monitoring baseline is (tasks.monitoring.baseline)
BASELINE_RUN_TAG = "baseline.run_id"
QUALITY_TAG = "quality.uri"  # where its data-quality constraints are (tasks.tabular.quality)
QUALITY_RUN_TAG = "quality.run_id"
RAW_URI_TAG = "dataset.raw.uri"  # the user's training data (a retrain's default data)
RAW_DIGEST_TAG = "dataset.raw.digest"
RAW_PINNED_TAG = "dataset.raw.pinned"  # the copy the execution read (tasks.tabular.snapshot)
LAST_VERDICT_TAG = "drift.last_verdict"  # the monitor's last decision about it
LAST_REPORT_TAG = "drift.last_report"
HISTORY_TAG = "drift.history"  # the monitoring history picture (tasks.monitoring.history)
QUALITY_LAST_VERDICT_TAG = "quality.last_verdict"  # the last judgement of its predictions by late labels
QUALITY_LAST_REPORT_TAG = "quality.last_report"
APPROVED_BY_TAG = "approval.by"  # the last approval decision: who, when, why (tasks.steps.approval)
APPROVAL_AT_TAG = "approval.at"
APPROVAL_REASON_TAG = "approval.reason"
APPROVAL_PREVIOUS_STATUS_TAG = "approval.previous_status"
APPROVAL_PREVIOUS_CHAMPION_TAG = "approval.previous_champion"  # the champion it replaced (or that stayed)
APPROVAL_EVENT_TAG = "approval.event_id"
APPROVAL_WAIT_TAG = "approval.waiting"  # a flow run waits for a decision in Prefect's UI, or waited in vain

# --- a monitoring check's run ------------------------------------------------------------------------
MODEL_NAME_TAG = "keel.model.name"  # the model and version it checked
MODEL_VERSION_TAG = "keel.model.version"
POLICY_TAG = "keel.policy"  # the retrain policy that decided
RETRAIN_TAG = "keel.retrain"  # whether the policy called for a retrain
SCORED_ROWS_TAG = "keel.scored.rows"  # rows a batch transform scored
LABELLED_ROWS_TAG = "keel.labelled.rows"  # predictions a label file's labels were joined to
DRIFT_REASONS_TAG = "keel.drift.reasons"
EVENT_TAG = "keel.event"  # the Prefect event it emitted, and its id
EVENT_ID_TAG = "keel.event_id"

# --- Prefect events about a model version ------------------------------------------------------------
DRIFT_DETECTED_EVENT = (
    "keel.drift.detected"  # the policy calls for a retrain (data, predictions or performance moved)
)
DRIFT_NOT_DETECTED_EVENT = "keel.drift.not-detected"  # checked: no retrain called for
MODEL_PENDING_EVENT = "keel.model.pending-approval"  # registered as PendingManualApproval: a person decides
MODEL_APPROVED_EVENT = "keel.model.approved"  # a person approved it (SageMaker: Model Package State Change)
MODEL_REJECTED_EVENT = "keel.model.rejected"
QUALITY_DROPPED_EVENT = "keel.quality.dropped"  # late labels: the champion's realized metric left its range
QUALITY_OK_EVENT = "keel.quality.ok"  # late labels: the champion's realized metric within its range
