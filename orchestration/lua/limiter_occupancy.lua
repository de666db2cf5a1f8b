-- occupancy: one consistent snapshot of a service, for ops pages and
-- metrics. Read-only: expired entries are filtered by score, not removed.
--
-- KEYS: see limiter_common.lua
-- ARGV: none
--
-- Returns {now_ms, {holder, expiry_ms, ...}, {granted, expiry_ms, ...},
-- {waiter, ticket_us, ...}, cooling_until_ms (0: not cooling), circuit state
-- ("closed", "open", "probing"), when an open circuit lets a probe through
-- (ms, 0 if not open)} with numbers as strings (Lua numbers would be
-- truncated to integers on the way out, and these exceed 2^31 anyway).

local now_ms = server_now()
local after_now = "(" .. int(now_ms)
return {
    int(now_ms),
    redis.call("zrangebyscore", holders, after_now, "+inf", "withscores"),
    redis.call("zrangebyscore", granted, after_now, "+inf", "withscores"),
    redis.call("zrange", waiters, 0, -1, "withscores"),
    int(cooling_until(now_ms) or 0),
    redis.call("hget", breaker, "state") or "closed",
    redis.call("hget", breaker, "retry_at") or "0",
}
