-- name: failed_calls
-- Which calls are currently failed, and why (retried on the next run)?
-- Columns: call_id, attempts, last_attempt_at, last_success_at (NULL if never
--   loaded), stage_count (stages still held from the last success, NULL if none),
--   last_run_id, error. Newest attempt first.
-- No parameters.
SELECT
  call_id::VARCHAR AS call_id,
  attempts,
  last_attempt_at,
  last_success_at,
  stage_count,
  last_run_id,
  error
FROM etl_calls
WHERE status = 'failed'
ORDER BY last_attempt_at DESC NULLS LAST, call_id::VARCHAR
