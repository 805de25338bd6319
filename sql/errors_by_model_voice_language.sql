-- name: errors_by_model_voice_language
-- Where do errors happen: error counts by model, voice provider and language hint.
-- Columns: model, voice_provider, language_hint, stages, stages_with_errors
--   (error_count > 0), errors (sum of error_count), errors_per_stage.
-- voice_provider: the externalVoice provider; else the voiceOverrides provider; else
--   `(built-in)` when the stage names an Ultravox voice; else `(none)` (stages without
--   any voice are kept, never dropped by the join).
-- NULLs: a NULL error_count is not summed (errors is 0 when no count is known); a
--   NULL model or language hint forms its own group.
-- Parameters: --since/--until (UTC created date, inclusive), --model.
WITH s AS (
  SELECT call_stage_id, model, voice, language_hint, error_count
  FROM call_stages
  WHERE ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
    AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
    AND ($model IS NULL OR model = $model)
),
v AS (
  SELECT
    call_stage_id,
    max(provider) FILTER (WHERE role = 'external') AS external_provider,
    max(provider) FILTER (WHERE role = 'override') AS override_provider
  FROM stage_voices
  GROUP BY call_stage_id
)
SELECT
  s.model,
  COALESCE(
    v.external_provider,
    v.override_provider,
    CASE WHEN s.voice IS NOT NULL THEN '(built-in)' ELSE '(none)' END
  ) AS voice_provider,
  s.language_hint,
  count(*) AS stages,
  count(*) FILTER (WHERE s.error_count > 0) AS stages_with_errors,
  COALESCE(sum(s.error_count), 0) AS errors,
  round(COALESCE(sum(s.error_count), 0) / count(*), 3) AS errors_per_stage
FROM s
LEFT JOIN v ON v.call_stage_id = s.call_stage_id
GROUP BY ALL
ORDER BY errors DESC, stages DESC, model NULLS LAST, voice_provider, language_hint NULLS LAST
