-- Events are read in the shape their row's `event_version` names and
-- brought to the current one by the code (domain::versions), so the load
-- of a command's streams returns each event's version with its payload.
-- Its output changes, which CREATE OR REPLACE cannot do; callers name the
-- columns they read, so a release before this one reads it unchanged.
DROP FUNCTION lock_and_load(bigint[], integer, text[], text[]);

CREATE FUNCTION lock_and_load(keys bigint[], wait_ms integer, types text[], ids text[],
                              OUT locked boolean, OUT aggregate_types text[],
                              OUT aggregate_ids text[], OUT sequences bigint[],
                              OUT payloads text[], OUT event_versions text[])
    LANGUAGE plpgsql AS
$$
DECLARE
    k        bigint;
    deadline timestamptz := clock_timestamp() + wait_ms * interval '1 millisecond';
    previous text        := current_setting('lock_timeout');
BEGIN
    IF wait_ms <= 0 THEN
        BEGIN
            FOR k IN SELECT DISTINCT x FROM unnest(keys) AS x ORDER BY x
                LOOP
                    IF NOT pg_try_advisory_xact_lock(k) THEN
                        RAISE EXCEPTION USING ERRCODE = 'lock_not_available';
                    END IF;
                END LOOP;
            locked := true;
        EXCEPTION
            WHEN lock_not_available THEN locked := false;
        END;
    ELSE
        FOR k IN SELECT DISTINCT x FROM unnest(keys) AS x ORDER BY x
            LOOP
                IF NOT pg_try_advisory_xact_lock(k) THEN
                    PERFORM set_config('lock_timeout',
                                       greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000))::bigint || 'ms',
                                       true);
                    PERFORM pg_advisory_xact_lock(k);
                END IF;
            END LOOP;
        PERFORM set_config('lock_timeout', previous, true);
        locked := true;
    END IF;
    SELECT coalesce(array_agg(e.aggregate_type ORDER BY e.aggregate_type, e.aggregate_id, e.sequence), '{}'),
           coalesce(array_agg(e.aggregate_id ORDER BY e.aggregate_type, e.aggregate_id, e.sequence), '{}'),
           coalesce(array_agg(e.sequence ORDER BY e.aggregate_type, e.aggregate_id, e.sequence), '{}'),
           coalesce(array_agg(e.payload::text ORDER BY e.aggregate_type, e.aggregate_id, e.sequence), '{}'),
           coalesce(array_agg(e.event_version ORDER BY e.aggregate_type, e.aggregate_id, e.sequence), '{}')
      INTO aggregate_types, aggregate_ids, sequences, payloads, event_versions
      FROM events AS e
      JOIN unnest(types, ids) AS s(t, i) ON e.aggregate_type = s.t AND e.aggregate_id = s.i;
END
$$;
