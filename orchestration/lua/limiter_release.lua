-- release: drop member's lease, reservation or place in the queue (so it
-- also withdraws a parked member), then hand the freed slots to waiters.
-- Idempotent.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] member
-- ARGV[2] limit
-- ARGV[3] grant_ttl_ms
-- ARGV[4] tokens_used   what the call reported it used ("": it did not say;
--                       its estimate keeps counting)
--
-- Returns {when the spent rate budget next lets the rest of the line through
-- (ms, 0: nobody waits on it), payloads to dispatch...}, the payloads in the
-- order they were granted.

local member = ARGV[1]
local limit = tonumber(ARGV[2])
local grant_ttl_ms = tonumber(ARGV[3])
local tokens_used = tonumber(ARGV[4] or "")

local now_ms = server_now()
if tokens_used then
    trim_window(now_ms)
    count_tokens(member, tokens_used)
end
redis.call("zrem", holders, member)
redis.call("hdel", owners, member)
redis.call("hdel", slot_tenant, member)
forget_waiter(member)
drop_expired(now_ms)
local handoffs = pump(now_ms, limit, grant_ttl_ms, nil)
local reply = {int(line_blocked_until(now_ms))}
for _, payload in ipairs(handoffs) do
    reply[#reply + 1] = payload
end
return reply
