#!/usr/bin/env bash
# Points this checkout's default DVC remote at S3 from the environment, in .dvc/config.local (never committed):
#   ELBORL_DVC_REMOTE=s3://bucket/prefix   where `dvc push` / `dvc pull` keep the pipeline's data (required)
#   AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL  an S3-compatible endpoint (MinIO, ...); unset: AWS itself
#   ELBORL_DVC_REMOTE_NAME                 the remote's name (default: storage)
# Credentials are not written anywhere: DVC reads them from the AWS environment or profile when it connects
# (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...). Also sets this project's offline DVC defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1
DVC=${DVC:-dvc}
command -v "$DVC" >/dev/null || DVC=.venv/bin/dvc
remote=${ELBORL_DVC_REMOTE:?set ELBORL_DVC_REMOTE=s3://bucket/prefix}
name=${ELBORL_DVC_REMOTE_NAME:-storage}
case "$remote" in
  s3://?*) ;;
  *) echo "ELBORL_DVC_REMOTE must be an s3:// URL, got '$remote'" >&2; exit 2 ;;
esac
# the site cache (DVC's per-repo index and locks) inside the project, whatever directory dvc runs from
"$DVC" config --local core.site_cache_dir "$PWD/.dvc/tmp/site-cache"
"$DVC" remote add --local --force --default "$name" "$remote"
endpoint=${AWS_ENDPOINT_URL_S3:-${AWS_ENDPOINT_URL:-}}
if [ -n "$endpoint" ]; then
  "$DVC" remote modify --local "$name" endpointurl "$endpoint"
else
  "$DVC" remote modify --local --unset "$name" endpointurl
fi
echo "dvc remote '$name' -> $remote${endpoint:+ (endpoint $endpoint)}"
