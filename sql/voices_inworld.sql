-- name: voices_inworld
-- Inworld voice settings per stage: model, speaking rate, temperature, text normalization.
-- One row per inworld voice (role `external` = externalVoice, `override` = voiceOverrides),
--   typed from stage_voices.settings with DuckDB JSON extraction; a missing or
--   mistyped field is NULL (TRY_CAST), never an error.
-- Common columns: call_id, call_stage_id, stage_index, created, stage_model (the
--   stage's LLM), role, voice_id, tts_model, speed (as in stage_voices).
-- Columns: model_id, speaking_rate, temperature (DOUBLE), apply_text_normalization
--   (BOOLEAN).
-- Parameters: --since/--until (UTC created date, inclusive), --model (stage model).
-- Use as a view: CREATE VIEW voices_inworld AS <this query without the $since/$until/$model conditions>.
SELECT
  v.call_id::VARCHAR AS call_id,
  v.call_stage_id::VARCHAR AS call_stage_id,
  s.stage_index,
  s.created,
  s.model AS stage_model,
  v.role,
  v.voice_id,
  v.model AS tts_model,
  v.speed,
  v.settings->>'$.modelId' AS model_id,
  TRY_CAST(v.settings->>'$.speakingRate' AS DOUBLE) AS speaking_rate,
  TRY_CAST(v.settings->>'$.temperature' AS DOUBLE) AS temperature,
  TRY_CAST(v.settings->>'$.applyTextNormalization' AS BOOLEAN) AS apply_text_normalization
FROM stage_voices v
JOIN call_stages s ON s.call_stage_id = v.call_stage_id
WHERE v.provider = 'inworld'
  AND ($since IS NULL OR timezone('UTC', s.created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', s.created)::DATE <= $until::DATE)
  AND ($model IS NULL OR s.model = $model)
ORDER BY s.created NULLS LAST, call_id, s.stage_index, v.role
