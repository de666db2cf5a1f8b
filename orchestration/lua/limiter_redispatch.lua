-- redispatch: cleanup + pump. Periodic maintenance calls it so that slots
-- of dead holders, and reservations whose message was lost, reach the
-- waiters even when no acquire or release happens.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] limit
-- ARGV[2] grant_ttl_ms
--
-- Returns {payloads to dispatch...}, earliest waiter first.

local limit = tonumber(ARGV[1])
local grant_ttl_ms = tonumber(ARGV[2])

local now_ms = server_now()
drop_expired(now_ms)
local handoffs = pump(now_ms, limit, grant_ttl_ms, nil)
return handoffs
