-- name: token_growth_by_model
-- How much does the prompt grow during a stage (latest - initial tokens), per model: p50, p90, max?
-- Columns: model, stages, stages_measured (both token counts known), p50_growth,
--   p90_growth (quantile_cont: linear interpolation between the two nearest ranks,
--   position (n - 1) * q over the sorted values), avg_growth, max_growth.
-- NULLs: a stage with a NULL initial or latest token count is not measured (it is in
--   `stages` but not in `stages_measured`); a model with no measured stage shows NULLs.
-- Parameters: --since/--until (UTC created date, inclusive), --model.
WITH growth AS (
  SELECT model, latest_token_count - initial_token_count AS growth
  FROM call_stages
  WHERE ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
    AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
    AND ($model IS NULL OR model = $model)
)
SELECT
  model,
  count(*) AS stages,
  count(growth) AS stages_measured,
  quantile_cont(growth, 0.5)::DOUBLE AS p50_growth,
  quantile_cont(growth, 0.9)::DOUBLE AS p90_growth,
  round(avg(growth), 2) AS avg_growth,
  max(growth) AS max_growth
FROM growth
GROUP BY model
ORDER BY model NULLS LAST
