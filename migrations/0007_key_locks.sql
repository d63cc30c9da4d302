-- Idempotency keys are locked in Postgres' two-key advisory lock space,
-- which never meets the one-key space of the stream locks: a key is chosen
-- by the client, and a hash collision of a crafted key with a hot seat's
-- stream must not let a request hold up that seat.
DROP FUNCTION claim_idempotency_key(bigint, integer, text, text);
DROP FUNCTION refuse_with_idempotency_key(bigint, integer, text, text, bytea, smallint, jsonb, bytea);

CREATE FUNCTION claim_idempotency_key(key_high integer, key_low integer, wait_ms integer,
                                      key_route text, key_text text)
    RETURNS TABLE
            (
                request bytea,
                status  smallint,
                headers jsonb,
                body    bytea
            )
    LANGUAGE plpgsql AS
$$
DECLARE
    -- The operator's own lock_timeout, put back after the bounded wait.
    previous text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
    PERFORM pg_advisory_xact_lock(key_high, key_low);
    PERFORM set_config('lock_timeout', previous, true);
    RETURN QUERY SELECT k.request, k.status, k.headers, k.body
                   FROM idempotency_keys AS k
                  WHERE k.route = key_route AND k.key = key_text;
END
$$;

CREATE FUNCTION refuse_with_idempotency_key(key_high integer, key_low integer, wait_ms integer,
                                            key_route text, key_text text, key_request bytea,
                                            refusal_status smallint, refusal_headers jsonb,
                                            refusal_body bytea)
    RETURNS TABLE
            (
                request bytea,
                status  smallint,
                headers jsonb,
                body    bytea
            )
    LANGUAGE plpgsql AS
$$
DECLARE
    -- The operator's own lock_timeout, put back after the bounded wait.
    previous text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
    PERFORM pg_advisory_xact_lock(key_high, key_low);
    PERFORM set_config('lock_timeout', previous, true);
    RETURN QUERY SELECT k.request, k.status, k.headers, k.body
                   FROM idempotency_keys AS k
                  WHERE k.route = key_route AND k.key = key_text;
    IF NOT FOUND THEN
        INSERT INTO idempotency_keys (route, key, request, status, headers, body)
        VALUES (key_route, key_text, key_request, refusal_status, refusal_headers, refusal_body);
        RETURN QUERY SELECT key_request, refusal_status, refusal_headers, refusal_body;
    END IF;
END
$$;

-- The same as before, but `wait_ms` bounds the whole wait for a command's
-- locks, not each lock's (a command of ten seats waited up to ten times
-- it), and the operator's lock_timeout is put back afterwards, not zeroed.
CREATE OR REPLACE FUNCTION lock_and_load(keys bigint[], wait_ms integer, types text[], ids text[],
                                         OUT locked boolean, OUT aggregate_types text[],
                                         OUT aggregate_ids text[], OUT sequences bigint[],
                                         OUT payloads text[])
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
           coalesce(array_agg(e.payload::text ORDER BY e.aggregate_type, e.aggregate_id, e.sequence), '{}')
      INTO aggregate_types, aggregate_ids, sequences, payloads
      FROM events AS e
      JOIN unnest(types, ids) AS s(t, i) ON e.aggregate_type = s.t AND e.aggregate_id = s.i;
END
$$;
