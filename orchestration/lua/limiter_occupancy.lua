-- occupancy: one consistent snapshot of a service, for ops pages and
-- metrics. Read-only: expired entries are filtered by score, not removed.
--
-- KEYS: see limiter_common.lua
-- ARGV: none
--
-- Returns {now_ms, {holder, expiry_ms, ...}, {granted, expiry_ms, ...},
-- {waiter, ticket_us, ...}, cooling_until_ms (0: not cooling), circuit state
-- ("closed", "open", "probing"), when an open circuit lets a probe through
-- (ms, 0 if not open), the requests-per-minute budget (0: none), the grants
-- it counts in the current window, when the next one frees up (ms, 0
-- while there is room), the tokens-per-minute budget (0: none) and the
-- tokens the window's calls count for, {tenant, its waiters without a
-- reservation, ...} in the order the fair line serves them} with numbers as strings (Lua numbers would be
-- truncated to integers on the way out, and these exceed 2^31 anyway).

local now_ms = server_now()
local rpm = tonumber(redis.call("hget", config, "rpm") or "0")
local window_ms = counted_window_ms()
local in_window = "(" .. int(now_ms - window_ms)
local counted = redis.call("zcount", starts, in_window, "+inf")
local tpm = tonumber(redis.call("hget", config, "tpm") or "0")
local used = 0
for _, member in ipairs(redis.call("zrangebyscore", starts, in_window, "+inf")) do
    used = used + tonumber(redis.call("hget", tokens, member) or "0")
end
local estimate = math.max(1, tonumber(redis.call("hget", config, "token_estimate") or "1"))
local rate_frees_at = 0
if (rpm > 0 and counted >= rpm) or (tpm > 0 and counted > 0 and used + estimate > tpm) then
    local oldest = redis.call("zrangebyscore", starts, in_window, "+inf", "withscores", "limit", 0, 1)
    rate_frees_at = tonumber(oldest[2]) + window_ms
end
local by_tenant = {}
for _, tenant in ipairs(redis.call("zrange", tenants, 0, -1)) do
    local low, high = lane_range(tenant)
    by_tenant[#by_tenant + 1] = tenant
    by_tenant[#by_tenant + 1] = redis.call("zlexcount", lanes, low, high)
end
local after_now = "(" .. int(now_ms)
return {
    int(now_ms),
    redis.call("zrangebyscore", holders, after_now, "+inf", "withscores"),
    redis.call("zrangebyscore", granted, after_now, "+inf", "withscores"),
    redis.call("zrange", waiters, 0, -1, "withscores"),
    int(cooling_until(now_ms) or 0),
    redis.call("hget", breaker, "state") or "closed",
    redis.call("hget", breaker, "retry_at") or "0",
    int(rpm),
    counted,
    int(rate_frees_at),
    int(tpm),
    int(used),
    by_tenant,
}
