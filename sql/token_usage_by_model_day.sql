-- name: token_usage_by_model_day
-- How many prompt tokens did each model handle each day?
-- Columns: day (UTC date of the stage's `created`), model, stages, stages_with_tokens
--   (latest_token_count known), stages_without_tokens (latest_token_count NULL),
--   initial_tokens and latest_tokens (sums of the known counts), tokens_added (sum of
--   latest - initial over stages where both counts are known).
-- NULLs: a NULL token count (e.g. a stage that never ran the model) is left out of the
--   sums, never counted as 0; stages_without_tokens shows how many there were. A sum
--   over no known counts is NULL. Stages with a NULL model form their own group.
-- Parameters: --since/--until (UTC created date, inclusive), --model.
SELECT
  timezone('UTC', created)::DATE AS day,
  model,
  count(*) AS stages,
  count(latest_token_count) AS stages_with_tokens,
  count(*) - count(latest_token_count) AS stages_without_tokens,
  sum(initial_token_count) AS initial_tokens,
  sum(latest_token_count) AS latest_tokens,
  sum(latest_token_count - initial_token_count) AS tokens_added
FROM call_stages
WHERE ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
  AND ($model IS NULL OR model = $model)
GROUP BY ALL
ORDER BY day NULLS LAST, model NULLS LAST
