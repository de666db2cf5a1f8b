-- outcome: what a call's end tells the circuit breaker, then hands freed
-- slots on. A success closes the circuit (a probe's, or any call's: the
-- service answers); a failure that counts adds one to the consecutive
-- failures, and the threshold-th, or a probe's, opens it for open_ms.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] member        whose call ended
-- ARGV[2] ok            1: it succeeded; 0: it failed in a way that counts
-- ARGV[3] threshold     consecutive failures that open the circuit (0: no breaker)
-- ARGV[4] open_ms       how long an open circuit grants nothing
-- ARGV[5] limit
-- ARGV[6] grant_ttl_ms
--
-- Returns {"closed" | "open" | "probing", 1 if this call opened it else 0,
-- {payloads to dispatch...}}.

local member = ARGV[1]
local ok = ARGV[2] == "1"
local threshold = tonumber(ARGV[3])
local open_ms = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local grant_ttl_ms = tonumber(ARGV[6])

local now_ms = server_now()
local state = redis.call("hget", breaker, "state")
if ok or threshold <= 0 then
    -- Closed (or no breaker any more): the line moves again.
    redis.call("del", breaker)
    local handoffs = {}
    if state then
        drop_expired(now_ms)
        handoffs = pump(now_ms, limit, grant_ttl_ms, nil)
    end
    return {"closed", 0, handoffs}
end

local failures = redis.call("hincrby", breaker, "failures", 1)
local probe_failed = state == "probing" and redis.call("hget", breaker, "probe") == member
if probe_failed or (not state and failures >= threshold) then
    redis.call("hset", breaker, "state", "open", "retry_at", int(now_ms + open_ms))
    redis.call("hdel", breaker, "probe")
    return {"open", 1, {}}
end
if not state then
    -- Counting failures only: the hash exists but the circuit is closed.
    return {"closed", 0, {}}
end
return {state, 0, {}}
