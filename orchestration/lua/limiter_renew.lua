-- renew: extend member's lease (heartbeat of an in-flight call).
--
-- KEYS: see limiter_common.lua
-- ARGV[1] member
-- ARGV[2] ttl_ms
-- ARGV[3] owner    id of the renewing process ("" if unknown): re-recorded,
--                  as Redis may have lost it with the lease
--
-- Returns 1 if member held a live lease, 0 if the lease was missing or had
-- expired. Either way member holds a lease afterwards: the call is running,
-- so counting it keeps the service's real concurrency honest even after
-- Redis lost its state (restart, failover) or the process stalled past ttl.
--
-- No cleanup and no pump: the heartbeat thread has nowhere to dispatch
-- hand-offs, and the next acquire/release/redispatch cleans up anyway.

local member = ARGV[1]
local ttl_ms = tonumber(ARGV[2])

local now_ms = server_now()
local expiry = redis.call("zscore", holders, member)
local live = expiry and tonumber(expiry) > now_ms
hold(member, now_ms, ttl_ms, ARGV[3])
if live then
    return 1
end
return 0
