-- release: drop member's lease, reservation or place in the queue (so it
-- also withdraws a parked member), then hand the freed slots to waiters.
-- Idempotent.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] member
-- ARGV[2] limit
-- ARGV[3] grant_ttl_ms
--
-- Returns {payloads to dispatch...}, earliest waiter first.

local member = ARGV[1]
local limit = tonumber(ARGV[2])
local grant_ttl_ms = tonumber(ARGV[3])

local now_ms = server_now()
redis.call("zrem", holders, member)
redis.call("hdel", owners, member)
forget_waiter(member)
drop_expired(now_ms)
local handoffs = pump(now_ms, limit, grant_ttl_ms, nil)
return handoffs
