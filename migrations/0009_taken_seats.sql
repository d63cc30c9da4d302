-- Best available (docs/api.md): the seats of each show that a booking holds
-- or owns, one row per seat, so that the command side can tell which seats
-- of a section are free without loading every seat stream. An inline
-- projection of the seat events, written in the statement that appends them
-- (as `pending_holds` and `buyer_seats` are), so it never disagrees with the
-- log. A held seat counts as taken until `expires_at` only: a lapsed hold is
-- free before the sweeper records its lapse. `expires_at` NULL: booked.
CREATE TABLE taken_seats
(
    show_id    uuid    NOT NULL,
    row_name   text    NOT NULL,
    number     integer NOT NULL CHECK (number > 0),
    booking_id uuid    NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (show_id, row_name, number)
);

-- The table as the log says it must be: each seat whose last event holds or
-- books it. Used below for a log written before this table existed, and by
-- the tests that compare it with the table the commands kept.
CREATE FUNCTION taken_seats_from_log()
    RETURNS TABLE (show_id uuid, row_name text, number integer, booking_id uuid,
                   expires_at timestamptz)
    LANGUAGE sql STABLE AS
$$
SELECT (p ->> 'show_id')::uuid,
       substring(p ->> 'label' FROM '^[A-Za-z]+'),
       substring(p ->> 'label' FROM '[0-9]+$')::integer,
       (p ->> 'booking_id')::uuid,
       CASE WHEN last.event_type = 'SeatHeld' THEN (p ->> 'expires_at')::timestamptz END
  FROM (SELECT DISTINCT ON (e.aggregate_id) e.aggregate_id, e.event_type, e.payload
          FROM events AS e
         WHERE e.aggregate_type = 'Seat'
         ORDER BY e.aggregate_id, e.sequence DESC) AS last
       CROSS JOIN LATERAL (SELECT last.payload -> last.event_type AS p) AS payload
 WHERE last.event_type IN ('SeatHeld', 'SeatBooked')
$$;

INSERT INTO taken_seats SELECT * FROM taken_seats_from_log();
