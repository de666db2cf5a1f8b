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
-- KEYS: holders, granted, waiters, payloads, ticket, census (see limiter_common.lua)
-- ARGV[1] ttl_ms        lease time to live given to each seeded member
-- ARGV[2...] members    the calls in flight
--
-- Returns how many members were added to holders (0 if the census existed).

if redis.call("exists", census) == 1 then
    return 0
end
local now_ms = server_now()
local expiry = int(now_ms + tonumber(ARGV[1]))
local added = 0
for i = 2, #ARGV do
    -- NX: a lease renewed since the loss keeps its own expiry.
    added = added + redis.call("zadd", holders, "NX", expiry, ARGV[i])
end
redis.call("set", census, "1")
return added
