-- name: calls_with_errors
-- Which calls had errors, worst first?
-- Columns: call_id, errors (sum of error_count over the call's stages), stages,
--   stages_with_errors, first_stage_created, last_stage_created, models (distinct,
--   comma-separated). Only calls with errors > 0; ties broken by call_id.
-- NULLs: a NULL error_count is not summed.
-- Parameters: --since/--until (UTC created date, inclusive), --model (only the
--   stages of that model count).
SELECT
  call_id::VARCHAR AS call_id,
  sum(error_count) AS errors,
  count(*) AS stages,
  count(*) FILTER (WHERE error_count > 0) AS stages_with_errors,
  min(created) AS first_stage_created,
  max(created) AS last_stage_created,
  string_agg(DISTINCT model, ', ' ORDER BY model) AS models
FROM call_stages
WHERE ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
  AND ($model IS NULL OR model = $model)
GROUP BY call_id
HAVING sum(error_count) > 0
ORDER BY errors DESC, stages_with_errors DESC, call_id::VARCHAR
