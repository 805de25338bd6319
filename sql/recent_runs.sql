-- name: recent_runs
-- What did the last 20 runs do (newest first)?
-- Columns: run_id, started_at, finished_at, seconds (NULL while running or after a
--   crash), status, calls_requested, calls_loaded, calls_not_found, calls_failed,
--   stages_loaded, http_requests, http_retries, tool_version.
-- No parameters.
SELECT
  run_id,
  started_at,
  finished_at,
  round(epoch(finished_at) - epoch(started_at), 1) AS seconds,
  status,
  calls_requested,
  calls_loaded,
  calls_not_found,
  calls_failed,
  stages_loaded,
  http_requests,
  http_retries,
  tool_version
FROM etl_runs
ORDER BY started_at DESC, run_id DESC
LIMIT 20
