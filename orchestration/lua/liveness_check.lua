-- liveness_check: which processes' heartbeats lapsed, and which Redis run this is.
--
-- KEYS[1] procs   ZSET process id -> expiry, ms (server clock)
-- KEYS[2] info    HASH process id -> identity (JSON)
--
-- Returns {run_id, {process id, identity JSON, ...}}. The run_id changes
-- whenever the server restarts (also from a snapshot, or on a failover), so
-- the caller learns of lost data in the same round trip. Read-only.

local t = redis.call("time")
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = {}
for _, id in ipairs(redis.call("zrangebyscore", KEYS[1], "-inf", string.format("%.0f", now_ms))) do
    dead[#dead + 1] = id
    dead[#dead + 1] = redis.call("hget", KEYS[2], id) or ""
end
return {string.match(redis.call("info", "server"), "run_id:(%x+)"), dead}
