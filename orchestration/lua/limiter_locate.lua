-- locate: where member stands. Read-only: expired entries are filtered by
-- score instead of removed, which gives the same answer as a cleanup.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] member
--
-- Returns "holder", "granted", "waiter" or nil.

local member = ARGV[1]
local now_ms = server_now()

local function live(key)
    local expiry = redis.call("zscore", key, member)
    return expiry and tonumber(expiry) > now_ms
end

if live(holders) then
    return "holder"
elseif live(granted) then
    return "granted"
elseif redis.call("zscore", waiters, member) then
    return "waiter"
end
return nil
