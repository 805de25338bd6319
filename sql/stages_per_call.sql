-- name: stages_per_call
-- How many stages do calls have (distribution)?
-- Columns: stages_in_call, calls, pct_calls (share of all calls listed, %),
--   cumulative_pct (calls with at most this many stages, %).
-- A call counts the stages that pass the filters. Calls loaded with zero stages
--   (etl_calls status `loaded`, no rows in call_stages) appear as 0 only when no
--   filter is given, since they have no created date or model to filter on.
-- Parameters: --since/--until (UTC created date, inclusive), --model.
WITH per_call AS (
  SELECT call_id, count(*) AS stages
  FROM call_stages
  WHERE ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
    AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
    AND ($model IS NULL OR model = $model)
  GROUP BY call_id
  UNION ALL
  SELECT c.call_id, 0 AS stages
  FROM etl_calls c
  WHERE c.status = 'loaded'
    AND $since IS NULL AND $until IS NULL AND $model IS NULL
    AND NOT EXISTS (SELECT 1 FROM call_stages s WHERE s.call_id = c.call_id)
)
SELECT
  stages AS stages_in_call,
  count(*) AS calls,
  round(100.0 * count(*) / sum(count(*)) OVER (), 2) AS pct_calls,
  round(100.0 * sum(count(*)) OVER (ORDER BY stages) / sum(count(*)) OVER (), 2) AS cumulative_pct
FROM per_call
GROUP BY stages
ORDER BY stages
