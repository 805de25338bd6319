-- name: voices_respeecher
-- Respeecher voice settings per stage: sampling parameters.
-- One row per respeecher voice (role `external` = externalVoice, `override` = voiceOverrides),
--   typed from stage_voices.settings with DuckDB JSON extraction; a missing or
--   mistyped field is NULL (TRY_CAST), never an error.
-- Common columns: call_id, call_stage_id, stage_index, created, stage_model (the
--   stage's LLM), role, voice_id, tts_model, speed (as in stage_voices).
-- Columns: seed, top_k (INTEGER), temperature, top_p, min_p, presence_penalty,
--   repetition_penalty, frequency_penalty (DOUBLE).
-- Parameters: --since/--until (UTC created date, inclusive), --model (stage model).
-- Use as a view: CREATE VIEW voices_respeecher AS <this query without the $since/$until/$model conditions>,
--   after the view stage_voice_rows (STAGE_VOICE_ROWS_SQL in pipeline/reports.py).
SELECT
  * EXCLUDE (provider, settings),
  TRY_CAST(settings->>'$.seed' AS INTEGER) AS seed,
  TRY_CAST(settings->>'$.temperature' AS DOUBLE) AS temperature,
  TRY_CAST(settings->>'$.topK' AS INTEGER) AS top_k,
  TRY_CAST(settings->>'$.topP' AS DOUBLE) AS top_p,
  TRY_CAST(settings->>'$.minP' AS DOUBLE) AS min_p,
  TRY_CAST(settings->>'$.presencePenalty' AS DOUBLE) AS presence_penalty,
  TRY_CAST(settings->>'$.repetitionPenalty' AS DOUBLE) AS repetition_penalty,
  TRY_CAST(settings->>'$.frequencyPenalty' AS DOUBLE) AS frequency_penalty
FROM stage_voice_rows
WHERE provider = 'respeecher'
  AND ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
  AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
  AND ($model IS NULL OR stage_model = $model)
ORDER BY created NULLS LAST, call_id, stage_index, role
