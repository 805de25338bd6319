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
-- Use as a view: CREATE VIEW voices_cartesia AS <this query without the $since/$until/$model conditions>,
--   after the view stage_voice_rows (STAGE_VOICE_ROWS_SQL in pipeline/reports.py).
SELECT
  * EXCLUDE (provider, settings),
  settings->>'$.emotion' AS emotion,
  TRY_CAST(settings->'$.emotions' AS VARCHAR[]) AS emotions,
  settings->>'$.generationConfig.emotion' AS generation_emotion,
  TRY_CAST(settings->>'$.generationConfig.speed' AS DOUBLE) AS generation_speed,
  TRY_CAST(settings->>'$.generationConfig.volume' AS DOUBLE) AS generation_volume,
  settings->>'$.generationConfig.pronunciationDictId' AS generation_pronunciation_dict_id
FROM stage_voice_rows
WHERE provider = 'cartesia'
  AND ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
  AND ($model IS NULL OR stage_model = $model)
ORDER BY created NULLS LAST, call_id, stage_index, role
