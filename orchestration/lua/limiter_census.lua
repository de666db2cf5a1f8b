-- census: count the calls in flight before granting anything.
--
-- Redis may lose the limiter's keys (restart without persistence, failover,
-- FLUSHDB) while calls are running. Their holders come back at their next
-- renewal, up to ttl / 3 later; a grant in between could exceed the limit.
-- So acquire refuses to decide until the census key exists, and the caller
-- first seeds holders with the members the system of record (PostgreSQL)
-- says are running. The first caller to arrive does it; later ones find the
-- key and change nothing.
--
-- The census key holds the run_id of the server it was taken on: a restart
-- from a snapshot restores the key but not the holders written after the
-- snapshot, and changes the run_id, so a census is taken again.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] ttl_ms        lease time to live given to each seeded member
-- ARGV[2...] members    the calls in flight
--
-- Returns how many members were added to holders (0 if this run has a census).

local current = run_id()
if redis.call("get", census) == current then
    return 0
end
local now_ms = server_now()
local expiry = int(now_ms + tonumber(ARGV[1]))
local added = 0
for i = 2, #ARGV do
    -- NX: a lease renewed since the loss keeps its own expiry.
    added = added + redis.call("zadd", holders, "NX", expiry, ARGV[i])
end
redis.call("set", census, current)
return added
