-- acquire: take a slot for member, or park it as a waiter.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] member        the lease holder id (e.g. a step attempt)
-- ARGV[2] limit         concurrency limit, read live by the caller
-- ARGV[3] ttl_ms        lease time to live
-- ARGV[4] grant_ttl_ms  how long a hand-off reserves a slot for its waiter
-- ARGV[5] payload       message to dispatch when this member is handed a slot
-- ARGV[6] owner         id of the caller's process ("" if unknown)
-- ARGV[7] rpm           grants per window the service allows (0: no budget)
-- ARGV[8] window_ms     the window rpm counts over (a minute)
-- ARGV[9] tenant        whose job it is (its API key's id; "" if none): the
--                       line is served round-robin across tenants
-- ARGV[10] weight       the tenant's share of turns (a positive integer)
-- ARGV[11] priority     within its tenant, a waiter goes priority * aging
-- ARGV[12] aging_us     microseconds earlier than its arrival
-- ARGV[13] tpm          tokens per window the service allows (0: no budget)
-- ARGV[14] token_estimate  the tokens a call is counted for until it reports
-- ARGV[15] cap          the most slots of this service the tenant may hold at
--                       once (0: no cap)
--
-- Returns {granted (1|0), position (how many would be served before it,
-- limiter_common.lua's position(); -1 when granted), {payloads to dispatch...}, cooling_until_ms (0: not cooling),
-- circuit (1: the circuit breaker holds the member back, else 0),
-- rate_frees_at_ms (a rate budget holds the member back until then; 0: none
-- does), rate_kind ("requests" or "tokens", the budget that does; "": none),
-- capped (1: the tenant holds as many slots as its cap allows, else 0)},
-- or {-1, -1, {}, 0, 0, 0, "", 0} without touching
-- anything when the census is missing or was taken on another run of the
-- Redis server: the caller takes a census (limiter_census.lua) and acquires
-- again.

local member = ARGV[1]
local limit = tonumber(ARGV[2])
local ttl_ms = tonumber(ARGV[3])
local grant_ttl_ms = tonumber(ARGV[4])
local payload = ARGV[5]
local owner = ARGV[6]
local rpm = tonumber(ARGV[7])
local window_ms = tonumber(ARGV[8])
local tenant = ARGV[9]
local weight = tonumber(ARGV[10])
local priority = tonumber(ARGV[11])
local aging_us = tonumber(ARGV[12])
local tpm = tonumber(ARGV[13])
local token_estimate = tonumber(ARGV[14])
local cap = tonumber(ARGV[15])

-- No census of this run: Redis is new or lost its data (restart without
-- persistence, restart from a snapshot, failover, flush). Calls still in
-- flight are missing from holders until their next renewal, so granting now
-- could exceed the limit.
if redis.call("get", census) ~= run_id() then
    return {-1, -1, {}, 0, 0, 0, "", 0}
end

-- The budget the scripts that grant without being told (release, redispatch) go by.
redis.call("hset", config, "rpm", rpm, "window_ms", window_ms, "tpm", tpm, "token_estimate", token_estimate)
-- The tenant's weight and cap as the caller has them: they apply from now on.
redis.call("hset", fair, "w:" .. tenant, weight, "c:" .. tenant, cap)

local now_ms, now_us = server_now()
drop_expired(now_ms)

-- Already holding (a redelivered message): refresh, idempotently.
-- Reserved by an earlier hand-off: the reservation becomes the lease, so
-- occupancy does not change even if the limit was lowered meanwhile.
if redis.call("zscore", holders, member) or redis.call("zscore", granted, member) then
    if redis.call("zscore", granted, member) then
        count_start(member, now_ms)  -- its call starts now, not when the slot was handed over
    end
    hold(member, now_ms, ttl_ms, owner)
    local handoffs = pump(now_ms, limit, grant_ttl_ms, nil)
    return {1, -1, handoffs, 0, 0, 0, "", 0}
end

-- Cooling down: no new call starts (a cool-down drops the reservations, so
-- nobody is granted meanwhile); the member parks.
local cooling = cooling_until(now_ms)
-- While the circuit is not closed, every grant goes through the line (pump).
local closed = not redis.call("hget", breaker, "state")

-- Fast path: a free slot and nobody queued without a reservation. Waiters
-- that hold reservations already own their slots, so they are not "ahead".
local unreserved = redis.call("zcard", waiters) - redis.call("zcard", granted)
local room, rate_frees_at = rate_room(now_ms)
if not cooling and closed and unreserved == 0 and occupied() < limit and room > 0 and not capped(tenant) then
    hold(member, now_ms, ttl_ms, owner)
    slot_taken(member, tenant)
    redis.call("set", moved, int(now_ms))
    count_start(member, now_ms)
    return {1, -1, {}, 0, 0, 0, "", 0}
end

-- Park. A member already waiting keeps its ticket and its lane entry, so a
-- duplicate or early message never loses (or jumps) its place.
if not redis.call("zscore", waiters, member) then
    park(member, now_us, tenant, priority, aging_us)
end
redis.call("hset", payloads, member, payload)

-- Slots may be free with waiters queued (limit raised, reservation lapsed):
-- the pump grants in queue order, possibly reaching this member too.
local handoffs, me_granted = pump(now_ms, limit, grant_ttl_ms, member)
if me_granted then
    hold(member, now_ms, ttl_ms, owner)
    return {1, -1, handoffs, 0, 0, 0, "", 0}
end
local held_by_circuit = (not cooling and circuit(now_ms) ~= "closed") and 1 or 0
local rate_kind
room, rate_frees_at, rate_kind = rate_room(now_ms)
local held_by_rate = not cooling and held_by_circuit == 0 and room <= 0
local held_by_cap = not cooling and held_by_circuit == 0 and not held_by_rate and capped(tenant)
return {
    0, position(member), handoffs, int(cooling or 0), held_by_circuit,
    held_by_rate and int(rate_frees_at) or 0, held_by_rate and rate_kind or "", held_by_cap and 1 or 0,
}
