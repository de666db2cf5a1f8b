-- luacheck: globals KEYS ARGV redis
-- Prelude shared by every limiter_*.lua script.
--
-- orchestration/limiter.py prepends this file to each operation script before
-- registering it, so an operation is still one EVALSHA: one atomic step.
--
-- Every limiter script takes the same KEYS, all under the service's hash tag
-- ("cao:lim:{<service>}:...") so they live in one cluster slot:
--
--   KEYS[1] holders   ZSET  member -> lease expiry, ms since the epoch
--   KEYS[2] granted   ZSET  member -> reservation expiry, ms; always a subset
--                           of waiters (a granted waiter keeps its place)
--   KEYS[3] waiters   ZSET  member -> arrival ticket, us, strictly increasing
--   KEYS[4] payloads  HASH  member -> opaque message dispatched on hand-off
--   KEYS[5] ticket    STRING the last ticket handed out
--   KEYS[6] census    STRING the run_id of the Redis server whose holders were
--                           seeded with the calls the system of record says
--                           are in flight; absent or stale after Redis lost
--                           its data (see limiter_census.lua)
--   KEYS[7] owners    HASH  holder -> id of the process running its call, so a
--                           dead process's slots can be reclaimed at once
--                           (limiter_reclaim.lua) instead of at lease expiry
--   KEYS[8] moved     STRING when a slot was last granted, ms: whether the
--                           line moves, for stuck-job detection
--   KEYS[9] cooldown  STRING until when, ms, the service cools down (it
--                           answered 429/503 with Retry-After): nothing is
--                           granted before then; expires by itself
--   KEYS[10] breaker  HASH  the circuit breaker, absent while closed:
--                           state "open" (nothing granted before retry_at,
--                           ms) or "probing" (one call, probe, let through
--                           after retry_at; nothing else until it reports)
--   KEYS[11] starts   ZSET  member -> when its slot was granted, ms,
--                           over the last window, budget or not: the
--                           requests-per-minute budget counts them (entries
--                           older are trimmed)
--   KEYS[12] config   HASH  rpm (grants per window, 0: no budget) and
--                           window_ms, as the last acquire passed them, for
--                           the scripts that grant without being told
--   KEYS[13] lanes    ZSET  every waiter without a reservation, all scores 0,
--                           as "<tenant>:<order>:<member>": by lexical order,
--                           each tenant's lane in its waiters' order (their
--                           arrival moved earlier by their priority)
--   KEYS[14] tenants  ZSET  tenant -> its virtual time, for the tenants with
--                           someone in their lane: the lowest is served next
--   KEYS[15] fair     HASH  "clock" (the virtual time last served), and per
--                           tenant "v:<tenant>" (its virtual time while its
--                           lane is empty) and "w:<tenant>" (its weight)
--   KEYS[16] lane_of  HASH  waiter -> its entry in lanes (kept while reserved)
--   KEYS[17] tokens   HASH  member -> the tokens its call counts for in the
--                           window of starts (the estimate from its grant,
--                           then what its reply reported); "=total" their sum.
--                           It expires with starts.
--   KEYS[18] slot_tenant HASH  member holding a slot (lease or reservation)
--                           granted in the fair line or at once -> its tenant,
--                           for the tenants' caps ("c:<tenant>" in fair)
--
-- The line is served by start-time fair queueing across tenants: each
-- grant advances its tenant's virtual time by VIRTUAL_STEP / weight, and a
-- tenant whose lane was empty starts again at the clock, so it can neither
-- bank turns while idle nor wait behind another tenant's backlog. Within a
-- lane, the earliest order goes first.
--
-- Occupied slots = |holders| + |granted|. Every time comes from the server's
-- TIME, never from a client, so hosts with skewed clocks agree on expiries.

local holders = KEYS[1]
local granted = KEYS[2]
local waiters = KEYS[3]
local payloads = KEYS[4]
local ticket = KEYS[5]
local census = KEYS[6]
local owners = KEYS[7]
local moved = KEYS[8]
local cooldown = KEYS[9]
local breaker = KEYS[10]
local starts = KEYS[11]
local config = KEYS[12]
local lanes = KEYS[13]
local tenants = KEYS[14]
local fair = KEYS[15]
local lane_of = KEYS[16]
local tokens = KEYS[17]
local slot_tenant = KEYS[18]
local TOTAL = "=total"  -- no member is named so: members are "<job>:<step>:<token>"

-- A grant of a weight-1 tenant: integers, so virtual times stay exact.
local VIRTUAL_STEP = 1000000
-- Digits of a lane entry's order, so that lexical order is numeric order.
local ORDER_WIDTH = 18

-- Scores and tickets exceed the 14 significant digits of Lua's tostring(),
-- so integers always cross into Redis through an explicit format.
local function int(n)
    return string.format("%.0f", n)
end

-- Returns the server time as (ms, us).
local function server_now()
    local t = redis.call("time")
    local s, us = tonumber(t[1]), tonumber(t[2])
    return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

-- The id of this Redis server's run: it changes at every restart, also one
-- that reloads a snapshot (RDB/AOF) or a failover to a replica, which keep
-- the census key while losing the holders written after the snapshot.
local function run_id()
    return string.match(redis.call("info", "server"), "run_id:(%x+)")
end

-- The lexical range of a tenant's lane in lanes.
local function lane_range(tenant)
    return "[" .. tenant .. ":", "(" .. tenant .. ";"
end

local function tenant_of(entry)
    return string.match(entry, "^([^:]*):")
end

-- How far a grant moves a tenant's virtual time.
local function virtual_step(tenant)
    local weight = tonumber(redis.call("hget", fair, "w:" .. tenant) or "1")
    return math.max(1, math.floor(VIRTUAL_STEP / math.max(weight, 1)))
end

-- Puts a waiter without a reservation in its tenant's lane; a tenant new to
-- the line starts at the clock (or later, if it was served ahead of it).
local function enter_lane(member)
    local entry = redis.call("hget", lane_of, member)
    if not entry then
        return
    end
    redis.call("zadd", lanes, 0, entry)
    local tenant = tenant_of(entry)
    if not redis.call("zscore", tenants, tenant) then
        local saved = tonumber(redis.call("hget", fair, "v:" .. tenant) or "0")
        local clock = tonumber(redis.call("hget", fair, "clock") or "0")
        redis.call("zadd", tenants, int(math.max(saved, clock)), tenant)
        redis.call("hdel", fair, "v:" .. tenant)
    end
end

-- Takes a waiter out of its lane (reserved, or gone); a tenant whose lane
-- empties leaves the line and keeps its virtual time.
local function leave_lane(member)
    local entry = redis.call("hget", lane_of, member)
    if not entry or redis.call("zrem", lanes, entry) == 0 then
        return
    end
    local tenant = tenant_of(entry)
    local low, high = lane_range(tenant)
    if redis.call("zlexcount", lanes, low, high) == 0 then
        local virtual = redis.call("zscore", tenants, tenant)
        redis.call("zrem", tenants, tenant)
        if virtual then
            redis.call("hset", fair, "v:" .. tenant, virtual)
        end
    end
end

-- A tenant's cap on the slots it holds at once (0: none).
local function cap_of(tenant)
    return tonumber(redis.call("hget", fair, "c:" .. tenant) or "0")
end

-- How many slots (leases and reservations) `tenant` holds.
local function tenant_use(tenant)
    local use = 0
    for _, key in ipairs({holders, granted}) do
        for _, member in ipairs(redis.call("zrange", key, 0, -1)) do
            if redis.call("hget", slot_tenant, member) == tenant then
                use = use + 1
            end
        end
    end
    return use
end

-- Whether `tenant` holds as many slots as its cap allows.
local function capped(tenant)
    local cap = cap_of(tenant)
    return cap > 0 and tenant_use(tenant) >= cap
end

-- Records the tenant of a member that takes a slot, for the caps.
local function slot_taken(member, tenant)
    redis.call("hset", slot_tenant, member, tenant)
end

-- The waiter served next, taken out of its lane, and its tenant (nil if
-- nobody waits without a reservation, or only tenants at their caps): the
-- head of the lane of the tenant with the lowest virtual time, ties by
-- tenant. `use` counts the slots each capped tenant holds (this pump's).
local function next_in_line(use)
    local index = 0
    while true do
        local entry = redis.call("zrange", tenants, index, index, "withscores")
        if #entry == 0 then
            return nil
        end
        local tenant, virtual = entry[1], tonumber(entry[2])
        local cap = cap_of(tenant)
        if cap > 0 and use[tenant] == nil then
            use[tenant] = tenant_use(tenant)
        end
        local low, high = lane_range(tenant)
        local head = (cap <= 0 or use[tenant] < cap) and redis.call("zrangebylex", lanes, low, high, "limit", 0, 1)[1]
        if head == nil then  -- cannot happen: a listed tenant has a lane
            redis.call("zrem", tenants, tenant)
            index = index - 1
        elseif head then
            redis.call("hset", fair, "clock", int(virtual))
            redis.call("zadd", tenants, int(virtual + virtual_step(tenant)), tenant)
            local member = string.sub(head, #tenant + 2 + ORDER_WIDTH + 1)
            leave_lane(member)
            if cap > 0 then
                use[tenant] = use[tenant] + 1
            end
            return member, tenant
        end
        index = index + 1
    end
end

-- Drops expired leases and lapsed reservations; returns how many. A lapsed
-- reservation only loses its slot: the waiter goes back to its place in its
-- lane and a later pump grants it (and dispatches its payload) again.
local function drop_expired(now_ms)
    local expired = redis.call("zrangebyscore", holders, "-inf", int(now_ms))
    for _, member in ipairs(expired) do
        redis.call("hdel", owners, member)
        redis.call("hdel", slot_tenant, member)
    end
    local lapsed = redis.call("zrangebyscore", granted, "-inf", int(now_ms))
    for _, member in ipairs(lapsed) do
        redis.call("hdel", slot_tenant, member)
        enter_lane(member)
    end
    return redis.call("zremrangebyscore", holders, "-inf", int(now_ms))
        + redis.call("zremrangebyscore", granted, "-inf", int(now_ms))
end

-- Until when (ms) the service cools down, or nil when it does not.
local function cooling_until(now_ms)
    local until_ms = tonumber(redis.call("get", cooldown) or "0")
    if until_ms > now_ms then
        return until_ms
    end
    return nil
end

-- The circuit breaker's say on grants: "closed" (none), "blocked" (grant
-- nothing), or "probe" (grant one waiter, the probe: the circuit was open
-- long enough, or its probe's lease or reservation lapsed).
local function circuit(now_ms)
    local state = redis.call("hget", breaker, "state")
    if not state then
        return "closed"
    end
    if state == "open" then
        if now_ms < tonumber(redis.call("hget", breaker, "retry_at") or "0") then
            return "blocked"
        end
        return "probe"
    end
    local probe = redis.call("hget", breaker, "probe")
    if probe and (redis.call("zscore", holders, probe) or redis.call("zscore", granted, probe)) then
        return "blocked"
    end
    return "probe"
end

-- The window a call is counted in: a hundredth longer than the budget's,
-- so a call that reaches the service a little after its slot was granted
-- still falls in the window the service counts it in.
local function counted_window_ms()
    local window_ms = tonumber(redis.call("hget", config, "window_ms") or "60000")
    return window_ms + math.floor(window_ms / 100)
end

-- Drops the calls that left the window, and their tokens.
local function trim_window(now_ms)
    local cutoff = int(now_ms - counted_window_ms())
    local gone = redis.call("zrangebyscore", starts, "-inf", cutoff)
    if #gone == 0 then
        return
    end
    local dropped = 0
    for _, member in ipairs(gone) do
        dropped = dropped + tonumber(redis.call("hget", tokens, member) or "0")
        redis.call("hdel", tokens, member)
    end
    if dropped ~= 0 then
        redis.call("hincrby", tokens, TOTAL, -dropped)
    end
    redis.call("zremrangebyscore", starts, "-inf", cutoff)
end

-- How many more slots the rate budgets let be granted now (a large number
-- without one), when (ms) the next one frees up if none, and which budget
-- holds the line back ("requests" or "tokens"; nil when none does). The
-- tokens budget counts each call for its estimate until it reports what it
-- used; a call alone in its window may exceed it, or nothing would pass.
local function rate_room(now_ms)
    local rpm = tonumber(redis.call("hget", config, "rpm") or "0")
    local tpm = tonumber(redis.call("hget", config, "tpm") or "0")
    if rpm <= 0 and tpm <= 0 then
        return 1000000000, nil, nil
    end
    trim_window(now_ms)
    local room, kind = 1000000000, nil
    if rpm > 0 then
        room, kind = rpm - redis.call("zcard", starts), "requests"
    end
    if tpm > 0 then
        local used = tonumber(redis.call("hget", tokens, TOTAL) or "0")
        local estimate = math.max(1, tonumber(redis.call("hget", config, "token_estimate") or "1"))
        local token_room = math.floor((tpm - used) / estimate)
        if token_room < 1 and redis.call("zcard", starts) == 0 then
            token_room = 1
        end
        if token_room < room then
            room, kind = token_room, "tokens"
        end
    end
    if room > 0 then
        return room, nil, nil
    end
    local oldest = redis.call("zrange", starts, 0, 0, "withscores")
    return room, oldest[2] and (tonumber(oldest[2]) + counted_window_ms()) or now_ms, kind
end

-- Counts a grant in the window, with or without a budget (a budget set later
-- then counts the calls already made in its first window), for the tokens
-- it is estimated to use. A member counted already (its reservation
-- becoming its lease, right before its call, or a lapsed reservation
-- granted again) is counted from now instead, for the tokens it has.
local function count_start(member, now_ms)
    local window_ms = counted_window_ms()
    trim_window(now_ms)
    redis.call("zadd", starts, int(now_ms), member)
    if not redis.call("hget", tokens, member) then
        local estimate = tonumber(redis.call("hget", config, "token_estimate") or "0")
        redis.call("hset", tokens, member, estimate)
        redis.call("hincrby", tokens, TOTAL, estimate)
    end
    redis.call("pexpire", starts, int(window_ms))
    redis.call("pexpire", tokens, int(window_ms))
end

-- A call's tokens as it reported them, in place of its estimate (a call
-- gone from the window counts no more).
local function count_tokens(member, used)
    local counted = redis.call("hget", tokens, member)
    if counted then
        redis.call("hset", tokens, member, used)
        redis.call("hincrby", tokens, TOTAL, used - tonumber(counted))
    end
end

local function occupied()
    return redis.call("zcard", holders) + redis.call("zcard", granted)
end

-- Hands free slots to the earliest waiters that hold no reservation yet.
-- Returns the payloads to dispatch, in queue order, and whether `me` (may be
-- nil) was among the waiters granted; `me`'s own payload is not returned.
local function pump(now_ms, limit, grant_ttl_ms, me)
    local handoffs, me_granted = {}, false
    local free = limit - occupied()
    -- A cooling service, or an open circuit, grants nothing: its waiters
    -- keep their places. A circuit due for a probe grants one waiter.
    local say = circuit(now_ms)
    if free <= 0 or cooling_until(now_ms) or say == "blocked" then
        return handoffs, me_granted
    end
    if say == "probe" then
        free = 1
    end
    free = math.min(free, (rate_room(now_ms)))
    if free <= 0 then
        return handoffs, me_granted
    end
    local expiry = int(now_ms + grant_ttl_ms)
    local use = {}
    while free > 0 do
        local member, tenant = next_in_line(use)
        if not member then
            break
        end
        redis.call("zadd", granted, expiry, member)
        slot_taken(member, tenant)
        redis.call("set", moved, int(now_ms))
        count_start(member, now_ms)
        free = free - 1
        if say == "probe" then
            redis.call("hset", breaker, "state", "probing", "probe", member)
        end
        if member == me then
            me_granted = true
        else
            local payload = redis.call("hget", payloads, member)
            -- A waiter without a payload cannot be dispatched; it keeps
            -- the reservation until it lapses or the member shows up.
            if payload then
                handoffs[#handoffs + 1] = payload
            end
        end
    end
    return handoffs, me_granted
end

-- When (ms) the spent rate budget next lets a waiter without a reservation
-- through, or 0 when nobody such waits or the budget has room: what a
-- release that could not pass its slot on leaves the line to a timer for.
local function line_blocked_until(now_ms)
    if redis.call("zcard", lanes) == 0 then
        return 0
    end
    local room, frees_at = rate_room(now_ms)
    if room > 0 or not frees_at then
        return 0
    end
    return frees_at
end

-- Removes every trace of a member except a lease.
local function forget_waiter(member)
    leave_lane(member)
    redis.call("hdel", lane_of, member)
    redis.call("zrem", granted, member)
    redis.call("zrem", waiters, member)
    redis.call("hdel", payloads, member)
end

-- Puts a new waiter in line: its arrival ticket (strictly increasing) in
-- waiters, and its lane entry, ordered by arrival moved earlier by
-- priority * aging_us (so a waiter of lower priority that waited longer
-- than the difference goes first: nobody starves).
local function park(member, now_us, tenant, priority, aging_us)
    local last = tonumber(redis.call("get", ticket) or "0")
    local mine = math.max(now_us, last + 1)
    redis.call("set", ticket, int(mine))
    redis.call("zadd", waiters, int(mine), member)
    local order = string.format("%0" .. ORDER_WIDTH .. ".0f", math.max(0, mine - priority * aging_us))
    redis.call("hset", lane_of, member, tenant .. ":" .. order .. ":" .. member)
    enter_lane(member)
end

-- A waiter's place in line: how many would be served before it, were no
-- one else to arrive. Its lane's entries ahead of it go first; so does
-- every other tenant's share of turns up to its own turn's virtual time
-- (the earlier tenant on a tie), as far as that tenant's lane reaches.
-- 0 for a reserved waiter.
local function position(member)
    local entry = redis.call("hget", lane_of, member)
    if not entry or not redis.call("zscore", lanes, entry) then
        return 0
    end
    local tenant = tenant_of(entry)
    local low = lane_range(tenant)
    local ahead = redis.call("zlexcount", lanes, low, "(" .. entry)
    local turn = tonumber(redis.call("zscore", tenants, tenant)) + ahead * virtual_step(tenant)
    local flat = redis.call("zrangebyscore", tenants, "-inf", int(turn), "withscores")
    for i = 1, #flat, 2 do
        local other, virtual = flat[i], tonumber(flat[i + 1])
        if other ~= tenant then
            local step = virtual_step(other)
            local turns = math.floor((turn - virtual) / step) + 1
            if virtual + (turns - 1) * step == turn and other > tenant then
                turns = turns - 1
            end
            local other_low, other_high = lane_range(other)
            ahead = ahead + math.min(turns, redis.call("zlexcount", lanes, other_low, other_high))
        end
    end
    return ahead
end

-- Makes member a holder until now + ttl; `owner` (may be nil or "") names
-- the process whose call it is.
local function hold(member, now_ms, ttl_ms, owner)
    forget_waiter(member)
    redis.call("zadd", holders, int(now_ms + ttl_ms), member)
    if owner and owner ~= "" then
        redis.call("hset", owners, member, owner)
    end
end

