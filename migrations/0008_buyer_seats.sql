-- Per-buyer seat limits (docs/api.md, "Per-user seat limit"): the seats each
-- buyer has in each show, one row per live booking. An inline projection of
-- the booking events, written in the same statement as they are (as
-- `pending_holds` is), so it never disagrees with the log; a command that
-- adds seats reads its buyer's rows while holding the buyer's advisory lock.
-- A hold counts until `expires_at` even before the sweeper records its
-- lapse; `expires_at` NULL: bought (placed, or a hold confirmed).
CREATE TABLE buyer_seats
(
    booking_id uuid PRIMARY KEY,
    show_id    uuid    NOT NULL,
    user_id    uuid    NOT NULL,
    seats      integer NOT NULL CHECK (seats > 0),
    expires_at timestamptz
);
CREATE INDEX buyer_seats_by_buyer ON buyer_seats (show_id, user_id);

-- The table as the log says it must be: every booking placed or held, less
-- those cancelled or expired, holds confirmed counted as bought. Used below
-- for a log written before this table existed, and by the tests that
-- compare it with the table the commands kept.
CREATE FUNCTION buyer_seats_from_log()
    RETURNS TABLE (booking_id uuid, show_id uuid, user_id uuid, seats integer,
                   expires_at timestamptz)
    LANGUAGE sql STABLE AS
$$
SELECT (p ->> 'booking_id')::uuid,
       (p ->> 'show_id')::uuid,
       (p ->> 'user_id')::uuid,
       json_array_length(p -> 'seats'),
       CASE
           WHEN b.event_type = 'BookingHeld' AND NOT EXISTS (
               SELECT 1 FROM events AS c
                WHERE c.aggregate_type = 'Booking' AND c.aggregate_id = b.aggregate_id
                  AND c.event_type = 'BookingConfirmed')
               THEN (p ->> 'expires_at')::timestamptz
       END
  FROM events AS b
       CROSS JOIN LATERAL (SELECT b.payload -> b.event_type AS p) AS e
 WHERE b.aggregate_type = 'Booking'
   AND b.event_type IN ('BookingHeld', 'BookingPlaced')
   AND NOT EXISTS (
       SELECT 1 FROM events AS c
        WHERE c.aggregate_type = 'Booking' AND c.aggregate_id = b.aggregate_id
          AND c.event_type IN ('BookingCancelled', 'BookingExpired'))
$$;

INSERT INTO buyer_seats SELECT * FROM buyer_seats_from_log();
