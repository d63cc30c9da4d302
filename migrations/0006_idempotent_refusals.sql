-- A refusal answered without the command's stream locks (the seats were
-- taken as of a snapshot, or while the command waited) is still the first
-- answer to its Idempotency-Key and must be kept for the key's retries. In
-- one round trip: waits (at most `wait_ms`) for the key's lock, returns the
-- stored answer if there is one (the key's first request may have won the
-- very seats), and otherwise stores the refusal and returns it.
CREATE FUNCTION refuse_with_idempotency_key(lock_key bigint, wait_ms integer, key_route text,
                                            key_text text, key_request bytea,
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
BEGIN
    PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
    PERFORM pg_advisory_xact_lock(lock_key);
    PERFORM set_config('lock_timeout', '0', true);
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
