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
-- Use as a view: CREATE VIEW voices_generic AS <this query without the $since/$until/$model conditions>.
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
  v.settings->>'$.url' AS url,
  TRY_CAST(v.settings->>'$.responseSampleRate' AS INTEGER) AS response_sample_rate,
  TRY_CAST(v.settings->>'$.responseWordsPerMinute' AS INTEGER) AS response_words_per_minute,
  v.settings->>'$.responseMimeType' AS response_mime_type,
  v.settings->>'$.jsonAudioFieldPath' AS json_audio_field_path,
  v.settings->>'$.jsonByteEncoding' AS json_byte_encoding,
  json_keys(v.settings, '$.headers') AS header_names,
  v.settings->'$.body' AS body
FROM stage_voices v
JOIN call_stages s ON s.call_stage_id = v.call_stage_id
WHERE v.provider = 'generic'
  AND ($since IS NULL OR timezone('UTC', s.created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', s.created)::DATE <= $until::DATE)
  AND ($model IS NULL OR s.model = $model)
ORDER BY s.created NULLS LAST, call_id, s.stage_index, v.role
