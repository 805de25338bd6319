-- name: data_freshness
-- How fresh is the warehouse: last run, last successful run, newest stage, calls by status?
-- One row. Columns: last_run_id, last_run_status, last_run_started_at,
--   last_run_finished_at, last_success_at (finish of the newest `succeeded` run),
--   hours_since_last_success, newest_stage_created, last_extracted_at, calls_loaded,
--   calls_not_found, calls_failed, stages.
-- NULLs: columns are NULL when no run or stage exists yet (an empty warehouse).
-- No parameters (see recent_runs and failed_calls for details).
WITH last_run AS (
  SELECT run_id, status, started_at, finished_at
  FROM etl_runs
  ORDER BY started_at DESC, run_id DESC
  LIMIT 1
),
success AS (
  SELECT max(finished_at) AS last_success_at FROM etl_runs WHERE status = 'succeeded'
),
calls AS (
  SELECT
    count(*) FILTER (WHERE status = 'loaded') AS calls_loaded,
    count(*) FILTER (WHERE status = 'not_found') AS calls_not_found,
    count(*) FILTER (WHERE status = 'failed') AS calls_failed
  FROM etl_calls
),
stages AS (
  SELECT count(*) AS stages, max(created) AS newest_stage_created, max(extracted_at) AS last_extracted_at
  FROM call_stages
)
SELECT
  (SELECT run_id FROM last_run) AS last_run_id,
  (SELECT status FROM last_run) AS last_run_status,
  (SELECT started_at FROM last_run) AS last_run_started_at,
  (SELECT finished_at FROM last_run) AS last_run_finished_at,
  success.last_success_at,
  round((epoch(now()) - epoch(success.last_success_at)) / 3600, 2) AS hours_since_last_success,
  stages.newest_stage_created,
  stages.last_extracted_at,
  calls.calls_loaded,
  calls.calls_not_found,
  calls.calls_failed,
  stages.stages
FROM success, calls, stages
