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
-- Use as a view: CREATE VIEW voices_elevenlabs AS <this query without the $since/$until/$model conditions>,
--   after the view stage_voice_rows (STAGE_VOICE_ROWS_SQL in pipeline/reports.py).
SELECT
  * EXCLUDE (provider, settings),
  TRY_CAST(settings->>'$.stability' AS DOUBLE) AS stability,
  TRY_CAST(settings->>'$.similarityBoost' AS DOUBLE) AS similarity_boost,
  TRY_CAST(settings->>'$.style' AS DOUBLE) AS style,
  TRY_CAST(settings->>'$.useSpeakerBoost' AS BOOLEAN) AS use_speaker_boost,
  TRY_CAST(settings->>'$.enableSsmlParsing' AS BOOLEAN) AS enable_ssml_parsing,
  TRY_CAST(settings->>'$.optimizeStreamingLatency' AS INTEGER) AS optimize_streaming_latency,
  TRY_CAST(settings->>'$.maxSampleRate' AS INTEGER) AS max_sample_rate,
  json_array_length(settings, '$.pronunciationDictionaries') AS pronunciation_dictionaries
FROM stage_voice_rows
WHERE provider = 'elevenLabs'
  AND ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
  AND ($model IS NULL OR stage_model = $model)
ORDER BY created NULLS LAST, call_id, stage_index, role
