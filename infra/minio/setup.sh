#!/bin/sh
# MinIO for keel: buckets, and one user per component with only what it needs (the root user stays
# with MinIO and this job). Idempotent: run it again and nothing changes. Needs MINIO_ROOT_USER,
# MINIO_ROOT_PASSWORD, MINIO_URL, KEEL_S3_SECRET_KEY, MLFLOW_S3_SECRET_KEY; policies in the folder of this file.
set -eu
: "${MINIO_URL:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${KEEL_S3_SECRET_KEY:?}" "${MLFLOW_S3_SECRET_KEY:?}"
here=$(dirname "$0")
mc alias set s3 "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing s3/mlflow s3/keel
for user in keel mlflow; do
  policy=$( [ "$user" = keel ] && echo keel-data || echo mlflow-artifacts )
  secret=$( [ "$user" = keel ] && echo "$KEEL_S3_SECRET_KEY" || echo "$MLFLOW_S3_SECRET_KEY" )
  mc admin policy create s3 "$policy" "$here/$policy.json"
  mc admin user add s3 "$user" "$secret"
  mc admin policy attach s3 "$policy" --user "$user" 2>/dev/null || mc admin user info s3 "$user" | grep -q "$policy"
done
