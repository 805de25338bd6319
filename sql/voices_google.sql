-- name: voices_google
-- Google (Chirp 3) voice settings per stage: voice name and speaking rate.
-- One row per google voice (role `external` = externalVoice, `override` = voiceOverrides),
--   typed from stage_voices.settings with DuckDB JSON extraction; a missing or
--   mistyped field is NULL (TRY_CAST), never an error.
-- Common columns: call_id, call_stage_id, stage_index, created, stage_model (the
--   stage's LLM), role, voice_id, tts_model, speed (as in stage_voices).
-- Columns: speaking_rate (DOUBLE).
-- Parameters: --since/--until (UTC created date, inclusive), --model (stage model).
-- Use as a view: CREATE VIEW voices_google AS <this query without the $since/$until/$model conditions>,
--   after the view stage_voice_rows (STAGE_VOICE_ROWS_SQL in pipeline/reports.py).
SELECT
  * EXCLUDE (provider, settings),
  TRY_CAST(settings->>'$.speakingRate' AS DOUBLE) AS speaking_rate
FROM stage_voice_rows
WHERE provider = 'google'
  AND ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
  AND ($model IS NULL OR stage_model = $model)
ORDER BY created NULLS LAST, call_id, stage_index, role
