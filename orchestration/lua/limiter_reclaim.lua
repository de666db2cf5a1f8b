-- reclaim: free at once the slots of calls whose process died.
--
-- A dead process stops renewing its leases, but they only expire after
-- lease_ttl_s (660 s for a video call). When its heartbeat has lapsed
-- (orchestration/liveness.py), its holders are dropped here and the freed
-- slots handed to the waiters. Owner entries whose holder is already gone
-- (released, expired) are cleaned up on the way.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] limit
-- ARGV[2] grant_ttl_ms
-- ARGV[3...] ids of the processes declared dead
--
-- Returns {{released members...}, {payloads to dispatch...}}.

local limit = tonumber(ARGV[1])
local grant_ttl_ms = tonumber(ARGV[2])
local dead = {}
for i = 3, #ARGV do
    dead[ARGV[i]] = true
end

local released = {}
local flat = redis.call("hgetall", owners)
for i = 1, #flat, 2 do
    local member, owner = flat[i], flat[i + 1]
    if dead[owner] then
        redis.call("zrem", holders, member)
        redis.call("hdel", owners, member)
        redis.call("hdel", slot_tenant, member)
        released[#released + 1] = member
    elseif not redis.call("zscore", holders, member) then
        redis.call("hdel", owners, member)
    end
end

local now_ms = server_now()
drop_expired(now_ms)
local handoffs = pump(now_ms, limit, grant_ttl_ms, nil)  -- (pump also returns a flag: not wanted here)
return {released, handoffs}
