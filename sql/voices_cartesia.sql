-- name: voices_cartesia
-- Cartesia voice settings per stage: emotion(s) and generation config.
-- One row per cartesia voice (role `external` = externalVoice, `override` = voiceOverrides),
--   typed from stage_voices.settings with DuckDB JSON extraction; a missing or
--   mistyped field is NULL (TRY_CAST), never an error.
-- Common columns: call_id, call_stage_id, stage_index, created, stage_model (the
--   stage's LLM), role, voice_id, tts_model, speed (as in stage_voices).
-- Columns: emotion (deprecated single emotion), emotions (deprecated, VARCHAR[]),
--   generation_emotion, generation_speed, generation_volume,
--   generation_pronunciation_dict_id (from generationConfig).
-- Parameters: --since/--until (UTC created date, inclusive), --model (stage model).
-- Use as a view: CREATE VIEW voices_cartesia AS <this query without the $since/$until/$model conditions>.
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
  v.settings->>'$.emotion' AS emotion,
  TRY_CAST(v.settings->'$.emotions' AS VARCHAR[]) AS emotions,
  v.settings->>'$.generationConfig.emotion' AS generation_emotion,
  TRY_CAST(v.settings->>'$.generationConfig.speed' AS DOUBLE) AS generation_speed,
  TRY_CAST(v.settings->>'$.generationConfig.volume' AS DOUBLE) AS generation_volume,
  v.settings->>'$.generationConfig.pronunciationDictId' AS generation_pronunciation_dict_id
FROM stage_voices v
JOIN call_stages s ON s.call_stage_id = v.call_stage_id
WHERE v.provider = 'cartesia'
  AND ($since IS NULL OR timezone('UTC', s.created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', s.created)::DATE <= $until::DATE)
  AND ($model IS NULL OR s.model = $model)
ORDER BY s.created NULLS LAST, call_id, s.stage_index, v.role
