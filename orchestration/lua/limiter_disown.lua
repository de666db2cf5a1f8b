-- disown: forget that the caller's process owns member's lease, if it still does.
--
-- A redelivered copy of a step message takes the slot before it learns that
-- the step already runs elsewhere (the claim without reading the job), and
-- taking it records the copy's process as the lease's owner. The call runs
-- in another process: were the copy's process declared dead, reclaim would
-- free a slot whose call is in flight. The copy gives the ownership up; the
-- running call's lease keeper records its own at its next renewal, and until
-- then the lease expires by itself if that process dies.
--
-- KEYS: see limiter_common.lua
-- ARGV[1] member
-- ARGV[2] owner    id of the calling process
--
-- Returns 1 if the ownership was the caller's and is gone, 0 otherwise.

if redis.call("hget", owners, ARGV[1]) == ARGV[2] then
    redis.call("hdel", owners, ARGV[1])
    return 1
end
return 0
