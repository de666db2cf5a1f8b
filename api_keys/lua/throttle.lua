-- throttle: one atomic rate-limit decision (GCRA, the "leaky bucket as a meter").
--
-- Each client's budget is one key holding its theoretical arrival time (TAT,
-- ms since the epoch, server clock). A rate of N per period P lets a client
-- spend N requests at once, then one every P / N; the key expires once the
-- budget is full again, so idle clients cost nothing.
--
-- KEYS[1] the client's key
-- ARGV[1] interval_ms  P / N: the time one request costs
-- ARGV[2] period_ms    P: how far the TAT may run ahead of now
--
-- Returns {1, 0} when the request is allowed (and counted), else
-- {0, wait_ms}: how long until the next request would be allowed.

local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local tat = math.max(tonumber(redis.call("get", KEYS[1]) or now), now)
local next_tat = tat + interval
if next_tat - now > period then
    return {0, math.ceil(next_tat - period - now)}
end
redis.call("set", KEYS[1], string.format("%.0f", next_tat), "PX", math.ceil(next_tat - now))
return {1, 0}
