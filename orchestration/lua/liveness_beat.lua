-- liveness_beat: a process says it is alive (orchestration/liveness.py).
--
-- KEYS[1] procs   ZSET process id -> expiry, ms (server clock)
-- KEYS[2] info    HASH process id -> identity (JSON)
-- ARGV[1] process id
-- ARGV[2] dead_after_ms   how long the process counts as alive without another beat
-- ARGV[3] identity JSON
--
-- The expiry comes from the server's TIME, so hosts with skewed clocks agree.

local t = redis.call("time")
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("zadd", KEYS[1], string.format("%.0f", now_ms + tonumber(ARGV[2])), ARGV[1])
redis.call("hset", KEYS[2], ARGV[1], ARGV[3])
return 1
