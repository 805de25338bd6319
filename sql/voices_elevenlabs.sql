-- name: voices_elevenlabs
-- ElevenLabs voice settings per stage: stability, similarity boost, style, speaker boost.
-- One row per elevenLabs voice (role `external` = externalVoice, `override` = voiceOverrides),
--   typed from stage_voices.settings with DuckDB JSON extraction; a missing or
--   mistyped field is NULL (TRY_CAST), never an error.
-- Common columns: call_id, call_stage_id, stage_index, created, stage_model (the
--   stage's LLM), role, voice_id, tts_model, speed (as in stage_voices).
-- Columns: stability, similarity_boost, style (DOUBLE), use_speaker_boost,
--   enable_ssml_parsing (BOOLEAN), optimize_streaming_latency, max_sample_rate (INTEGER),
--   pronunciation_dictionaries (number of dictionary references).
-- Parameters: --since/--until (UTC created date, inclusive), --model (stage model).
-- Use as a view: CREATE VIEW voices_elevenlabs AS <this query without the $since/$until/$model conditions>.
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
  TRY_CAST(v.settings->>'$.stability' AS DOUBLE) AS stability,
  TRY_CAST(v.settings->>'$.similarityBoost' AS DOUBLE) AS similarity_boost,
  TRY_CAST(v.settings->>'$.style' AS DOUBLE) AS style,
  TRY_CAST(v.settings->>'$.useSpeakerBoost' AS BOOLEAN) AS use_speaker_boost,
  TRY_CAST(v.settings->>'$.enableSsmlParsing' AS BOOLEAN) AS enable_ssml_parsing,
  TRY_CAST(v.settings->>'$.optimizeStreamingLatency' AS INTEGER) AS optimize_streaming_latency,
  TRY_CAST(v.settings->>'$.maxSampleRate' AS INTEGER) AS max_sample_rate,
  json_array_length(v.settings, '$.pronunciationDictionaries') AS pronunciation_dictionaries
FROM stage_voices v
JOIN call_stages s ON s.call_stage_id = v.call_stage_id
WHERE v.provider = 'elevenLabs'
  AND ($since IS NULL OR timezone('UTC', s.created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', s.created)::DATE <= $until::DATE)
  AND ($model IS NULL OR s.model = $model)
ORDER BY s.created NULLS LAST, call_id, s.stage_index, v.role
