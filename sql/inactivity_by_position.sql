-- name: inactivity_by_position
-- For the 1st, 2nd, ... inactivity message of a stage: how many, when they fire, and what happens after.
-- Columns: position (0-based), messages, min/median/max_offset_seconds (cumulative
--   seconds after the last user activity; median = quantile_cont 0.5),
--   min/max_duration_seconds (this message's own wait), end_unspecified,
--   end_hang_up_soft, end_hang_up_strict, end_other (unknown values), ends_call
--   (soft + strict hang-ups).
-- NULLs: an unparseable duration has NULL seconds and is left out of min/median/max.
-- Parameters: --since/--until (UTC created date, inclusive), --model.
SELECT
  m.position,
  count(*) AS messages,
  min(m.offset_seconds) AS min_offset_seconds,
  quantile_cont(m.offset_seconds::DOUBLE, 0.5) AS median_offset_seconds,
  max(m.offset_seconds) AS max_offset_seconds,
  min(m.duration_seconds) AS min_duration_seconds,
  max(m.duration_seconds) AS max_duration_seconds,
  count(*) FILTER (WHERE m.end_behavior = 'END_BEHAVIOR_UNSPECIFIED') AS end_unspecified,
  count(*) FILTER (WHERE m.end_behavior = 'END_BEHAVIOR_HANG_UP_SOFT') AS end_hang_up_soft,
  count(*) FILTER (WHERE m.end_behavior = 'END_BEHAVIOR_HANG_UP_STRICT') AS end_hang_up_strict,
  count(*) FILTER (WHERE m.end_behavior NOT IN (
    'END_BEHAVIOR_UNSPECIFIED', 'END_BEHAVIOR_HANG_UP_SOFT', 'END_BEHAVIOR_HANG_UP_STRICT'
  )) AS end_other,
  count(*) FILTER (WHERE m.end_behavior IN (
    'END_BEHAVIOR_HANG_UP_SOFT', 'END_BEHAVIOR_HANG_UP_STRICT'
  )) AS ends_call
FROM stage_inactivity_messages m
JOIN call_stages s ON s.call_stage_id = m.call_stage_id
WHERE ($since IS NULL OR timezone('UTC', s.created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', s.created)::DATE <= $until::DATE)
  AND ($model IS NULL OR s.model = $model)
GROUP BY m.position
ORDER BY m.position
