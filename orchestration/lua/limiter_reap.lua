-- reap: drop expired leases and lapsed reservations, without granting.
--
-- KEYS: see limiter_common.lua
-- ARGV: none
--
-- Returns how many entries were dropped.

return drop_expired(server_now())
