-- name: inactivity_setups
-- Which inactivity-message setups are used (message count, offsets, end behaviours) and how often?
-- Columns: messages (inactivity messages in the stage), offsets_seconds (when each
--   message fires after the last user activity, cumulative, ` / `-separated, `?` when
--   a duration could not be parsed), end_behaviors (END_BEHAVIOR_ prefix dropped),
--   stages, pct_stages.
-- Stages without inactivity messages are the row with messages = 0 and empty lists.
-- Parameters: --since/--until (UTC created date, inclusive), --model.
WITH s AS (
  SELECT call_stage_id
  FROM call_stages
  WHERE ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
    AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
    AND ($model IS NULL OR model = $model)
),
m AS (
  SELECT
    call_stage_id,
    count(*) AS messages,
    string_agg(
      COALESCE(regexp_replace(offset_seconds::VARCHAR, '\.?0+$', ''), '?'),
      ' / ' ORDER BY position
    ) AS offsets_seconds,
    string_agg(replace(end_behavior, 'END_BEHAVIOR_', ''), ' / ' ORDER BY position) AS end_behaviors
  FROM stage_inactivity_messages
  GROUP BY call_stage_id
)
SELECT
  COALESCE(m.messages, 0) AS messages,
  COALESCE(m.offsets_seconds, '') AS offsets_seconds,
  COALESCE(m.end_behaviors, '') AS end_behaviors,
  count(*) AS stages,
  round(100.0 * count(*) / sum(count(*)) OVER (), 2) AS pct_stages
FROM s
LEFT JOIN m ON m.call_stage_id = s.call_stage_id
GROUP BY ALL
ORDER BY stages DESC, messages, offsets_seconds, end_behaviors
