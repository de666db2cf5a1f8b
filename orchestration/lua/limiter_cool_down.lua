-- cool_down: grant nothing until delay_ms from now (the service answered
-- 429/503 with Retry-After). Calls in flight go on; callers and waiters park
-- and keep their places; reservations not yet taken are dropped (their
-- waiters stay first in line). A cool-down is only ever extended.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] delay_ms
--
-- Returns the cool-down's end, ms (server clock).

local delay_ms = tonumber(ARGV[1])

local now_ms = server_now()
local until_ms = math.max(cooling_until(now_ms) or 0, now_ms + delay_ms)
redis.call("set", cooldown, int(until_ms), "px", int(until_ms - now_ms))
-- The reservations go back to their waiters' places in their lanes.
for _, member in ipairs(redis.call("zrange", granted, 0, -1)) do
    redis.call("hdel", slot_tenant, member)
    enter_lane(member)
end
redis.call("del", granted)
return int(until_ms)
