-- Check every sliding window of one outgoing user and, only if none would be exceeded,
-- count one event in each. Atomic (one script), one round trip, one key per user.
--
-- KEYS[1]  og:{<user_id>}:limits -- one hash per user, fields "<window>:<bucket index>"
-- ARGV[1]  now, float epoch seconds (injected by the caller, never Redis TIME)
-- ARGV[2..] triples: window name, window seconds, limit ("" = unlimited, still counted)
--          in checking order; the first full window is reported.
--
-- Returns { allowed (1/0), full window name or "", then per window in argument order the
-- previous and current bucket counts as they were before this call }.
--
-- The estimate is scoring/limits.py's: previous * (1 - elapsed / seconds) + current,
-- same operations in the same order so both sides agree to the last bit.
-- Fields of the given windows that are neither the current nor the previous bucket are
-- deleted on every call, and the key expires two of its longest windows after last use,
-- so a user's hash holds at most two fields per window.

local key = KEYS[1]
local now = tonumber(ARGV[1])

local stored = redis.call("HGETALL", key)
local values = {}
for i = 1, #stored, 2 do
  values[stored[i]] = tonumber(stored[i + 1])
end

local names, current_fields, keep = {}, {}, {}
local result = { 1, "" }
local longest = 0
for i = 2, #ARGV, 3 do
  local name = ARGV[i]
  local seconds = tonumber(ARGV[i + 1])
  local limit = tonumber(ARGV[i + 2])
  local bucket = math.floor(now / seconds)
  local current_field = string.format("%s:%d", name, bucket)
  local previous_field = string.format("%s:%d", name, bucket - 1)
  local previous = values[previous_field] or 0
  local current = values[current_field] or 0
  names[name] = true
  keep[current_field] = true
  keep[previous_field] = true
  current_fields[#current_fields + 1] = current_field
  if seconds > longest then
    longest = seconds
  end
  if limit ~= nil and result[1] == 1 then
    local elapsed = now - bucket * seconds
    local estimate = previous * (1 - elapsed / seconds) + current
    if estimate + 1 > limit then
      result[1] = 0
      result[2] = name
    end
  end
  result[#result + 1] = previous
  result[#result + 1] = current
end

local stale = {}
for field in pairs(values) do
  local name = string.match(field, "^(.*):%-?%d+$")
  if name ~= nil and names[name] and not keep[field] then
    stale[#stale + 1] = field
  end
end
if #stale > 0 then
  redis.call("HDEL", key, unpack(stale))
end

if result[1] == 1 then
  for _, field in ipairs(current_fields) do
    redis.call("HINCRBY", key, field, 1)
  end
  local ttl = 2 * longest
  if redis.call("TTL", key) < ttl then
    redis.call("EXPIRE", key, ttl)
  end
end

return result
