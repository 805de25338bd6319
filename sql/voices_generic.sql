-- name: voices_generic
-- Generic REST TTS voices per stage: endpoint URL, response sample rate and format.
-- One row per generic voice (role `external` = externalVoice, `override` = voiceOverrides),
--   typed from stage_voices.settings with DuckDB JSON extraction; a missing or
--   mistyped field is NULL (TRY_CAST), never an error.
-- Common columns: call_id, call_stage_id, stage_index, created, stage_model (the
--   stage's LLM), role, voice_id, tts_model, speed (as in stage_voices).
-- Columns: url, response_sample_rate, response_words_per_minute (INTEGER),
--   response_mime_type, json_audio_field_path, json_byte_encoding, header_names
--   (VARCHAR[]; header values are redacted at load and not shown), body (JSON).
-- Parameters: --since/--until (UTC created date, inclusive), --model (stage model).
-- Use as a view: CREATE VIEW voices_generic AS <this query without the $since/$until/$model conditions>,
--   after the view stage_voice_rows (STAGE_VOICE_ROWS_SQL in pipeline/reports.py).
SELECT
  * EXCLUDE (provider, settings),
  settings->>'$.url' AS url,
  TRY_CAST(settings->>'$.responseSampleRate' AS INTEGER) AS response_sample_rate,
  TRY_CAST(settings->>'$.responseWordsPerMinute' AS INTEGER) AS response_words_per_minute,
  settings->>'$.responseMimeType' AS response_mime_type,
  settings->>'$.jsonAudioFieldPath' AS json_audio_field_path,
  settings->>'$.jsonByteEncoding' AS json_byte_encoding,
  json_keys(settings, '$.headers') AS header_names,
  settings->'$.body' AS body
FROM stage_voice_rows
WHERE provider = 'generic'
  AND ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
  AND ($model IS NULL OR stage_model = $model)
ORDER BY created NULLS LAST, call_id, stage_index, role
