-- name: voice_usage
-- Which voice providers and voices do stages use?
-- Columns: voice_source (`external` = externalVoice; `built-in` = an Ultravox voice
--   named in `voice`; `none` = neither), provider (externalVoice provider, or the
--   voiceOverrides provider of a built-in voice, else NULL), voice (external voice_id or
--   built-in voice name), stages, stages_with_overrides, calls, pct_stages.
-- Every stage is counted exactly once, stages without voices included.
-- Parameters: --since/--until (UTC created date, inclusive), --model.
WITH s AS (
  SELECT call_stage_id, call_id, voice
  FROM call_stages
  WHERE ($since IS NULL OR timezone('UTC', created)::DATE >= $since::DATE)
    AND ($until IS NULL OR timezone('UTC', created)::DATE <= $until::DATE)
    AND ($model IS NULL OR model = $model)
),
v AS (
  SELECT
    call_stage_id,
    bool_or(role = 'external') AS has_external,
    max(provider) FILTER (WHERE role = 'external') AS external_provider,
    max(voice_id) FILTER (WHERE role = 'external') AS external_voice_id,
    bool_or(role = 'override') AS has_override,
    max(provider) FILTER (WHERE role = 'override') AS override_provider
  FROM stage_voices
  GROUP BY call_stage_id
)
SELECT
  CASE
    WHEN COALESCE(v.has_external, false) THEN 'external'
    WHEN s.voice IS NOT NULL THEN 'built-in'
    ELSE 'none'
  END AS voice_source,
  CASE
    WHEN COALESCE(v.has_external, false) THEN v.external_provider
    ELSE v.override_provider
  END AS provider,
  CASE
    WHEN COALESCE(v.has_external, false) THEN v.external_voice_id
    ELSE s.voice
  END AS voice,
  count(*) AS stages,
  count(*) FILTER (WHERE COALESCE(v.has_override, false)) AS stages_with_overrides,
  count(DISTINCT s.call_id) AS calls,
  round(100.0 * count(*) / sum(count(*)) OVER (), 2) AS pct_stages
FROM s
LEFT JOIN v ON v.call_stage_id = s.call_stage_id
GROUP BY ALL
ORDER BY stages DESC, voice_source, provider NULLS LAST, voice NULLS LAST
