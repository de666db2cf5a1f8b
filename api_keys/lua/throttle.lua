-- throttle: one atomic rate-limit decision over one or more budgets (GCRA,
-- the "leaky bucket as a meter").
--
-- Each budget of a client is one key holding its theoretical arrival time
-- (TAT, ms since the epoch, server clock). A rate of N per period P lets a
-- client spend N requests at once, then one every P / N; the key expires
-- once the budget is full again, so idle clients cost nothing.
--
-- KEYS[i]        the client's key of budget i (e.g. all requests, job creation)
-- ARGV[2i - 1]   interval_ms of budget i: P / N, the time one request costs
-- ARGV[2i]       period_ms of budget i: P, how far the TAT may run ahead of now
--
-- The request passes only if every budget allows it, and then it is counted
-- in every one; a refused request spends nothing. Returns {1, 0} when it is
-- allowed, else {0, wait_ms}: how long until every budget would allow it.

local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local next_tats = {}
local wait = 0
for i, key in ipairs(KEYS) do
    local interval = tonumber(ARGV[2 * i - 1])
    local period = tonumber(ARGV[2 * i])
    local tat = math.max(tonumber(redis.call("get", key) or now), now)
    next_tats[i] = tat + interval
    if next_tats[i] - now > period then
        wait = math.max(wait, math.ceil(next_tats[i] - period - now))
    end
end
if wait > 0 then
    return {0, wait}
end
for i, key in ipairs(KEYS) do
    redis.call("set", key, string.format("%.0f", next_tats[i]), "PX", math.ceil(next_tats[i] - now))
end
return {1, 0}
