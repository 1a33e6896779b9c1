-- Check every sliding window of one outgoing user and, only if none would be exceeded,
-- count one event in each. Atomic (one script), one round trip, one key per user, plus the
-- user's lock key when asked, so MAIL needs a single round trip for the lock and all limits.
--
-- KEYS[1]  og:{<user_id>}:limits -- one hash per user, fields "<window>:<bucket index>"
-- KEYS[2]  optional: og:{<user_id>}:lock -- when it exists nothing is counted and its value
--          is returned
-- ARGV[1]  now, float epoch seconds (injected by the caller, never Redis TIME)
-- ARGV[2]  a field to give one event back first ("" for none), e.g. a recipient reserved at
--          MAIL that no RCPT used; never taken below zero
-- ARGV[3..] quads: window name, window seconds, limit ("" = unlimited, still counted),
--          optional ("1": counted only when it fits, never refuses; "0": required)
--          in checking order; the first full required window is reported.
--
-- Returns { allowed (1/0), full window name or "", lock value or "", then per window in
-- argument order the previous and current bucket counts as they were before this call and
-- 1/0 for counted }.
--
-- The estimate is scoring/limits.py's: previous * (1 - elapsed / seconds) + current,
-- same operations in the same order so both sides agree to the last bit.
-- A field of the bucket after the current one (a proxy whose clock runs ahead) counts as
-- current. Other fields of the given windows that are neither the current nor the previous
-- bucket are deleted on every call, and the key expires two of its longest windows after
-- last use, so a user's hash holds two fields per window (three while clocks disagree).

local key = KEYS[1]
local now = tonumber(ARGV[1])

if ARGV[2] ~= "" then
  local held = tonumber(redis.call("HGET", key, ARGV[2]) or "0")
  if held > 0 then
    redis.call("HINCRBY", key, ARGV[2], -1)
  end
end

if KEYS[2] then
  local lock = redis.call("GET", KEYS[2])
  if lock then
    return { 0, "", lock }
  end
end

local stored = redis.call("HGETALL", key)
local values = {}
for i = 1, #stored, 2 do
  values[stored[i]] = tonumber(stored[i + 1])
end

-- Each window's bucket first: the fields of a window are then sorted into its previous and
-- current bucket, the next one (counted as current: written by a proxy whose clock runs up to
-- one bucket ahead of this caller's, e.g. another host a second ahead at a bucket's turn) and
-- the stale rest (older than the previous bucket, or further ahead), which is deleted.
local specs, buckets = {}, {}
local longest = 0
for i = 3, #ARGV, 4 do
  local name = ARGV[i]
  local seconds = tonumber(ARGV[i + 1])
  local bucket = math.floor(now / seconds)
  specs[#specs + 1] = { name = name, seconds = seconds, bucket = bucket,
                        limit = tonumber(ARGV[i + 2]), optional = ARGV[i + 3] == "1" }
  buckets[name] = bucket
  if seconds > longest then
    longest = seconds
  end
end

local ahead, stale = {}, {}
for field, value in pairs(values) do
  local name, index = string.match(field, "^(.*):(%-?%d+)$")
  local bucket = name and buckets[name]
  if bucket ~= nil then
    index = tonumber(index)
    if index == bucket + 1 then
      ahead[name] = value
    elseif index < bucket - 1 or index > bucket + 1 then
      stale[#stale + 1] = field
    end
  end
end

local windows = {}
local result = { 1, "", "" }
for _, spec in ipairs(specs) do
  local name, seconds, bucket = spec.name, spec.seconds, spec.bucket
  local current_field = string.format("%s:%d", name, bucket)
  local previous_field = string.format("%s:%d", name, bucket - 1)
  local previous = values[previous_field] or 0
  local current = (values[current_field] or 0) + (ahead[name] or 0)
  local fits = true
  if spec.limit ~= nil then
    local elapsed = now - bucket * seconds
    local estimate = previous * (1 - elapsed / seconds) + current
    fits = estimate + 1 <= spec.limit
  end
  if not fits and not spec.optional and result[1] == 1 then
    result[1] = 0
    result[2] = name
  end
  windows[#windows + 1] = { field = current_field, fits = fits, optional = spec.optional }
  result[#result + 1] = previous
  result[#result + 1] = current
  result[#result + 1] = 0
end

if #stale > 0 then
  redis.call("HDEL", key, unpack(stale))
end

if result[1] == 1 then
  local counted = false
  for i, window in ipairs(windows) do
    if window.fits or not window.optional then
      redis.call("HINCRBY", key, window.field, 1)
      result[3 + 3 * i] = 1
      counted = true
    end
  end
  if counted then
    local ttl = 2 * longest
    if redis.call("TTL", key) < ttl then
      redis.call("EXPIRE", key, ttl)
    end
  end
end

return result
