-- Compromise detection: measure one message, add its points, climb or descend the ladder.
-- One round trip on the user's hash-tagged keys. The policy (weights, thresholds, the
-- formulas) is scoring/risk.py; this mirrors points() and rung_for() and a test checks that
-- both agree. Subjects: the identity, and "*" for the outgoing user as a whole.
--
-- KEYS[1] state hash          og:{u}:risk
-- KEYS[2] identity domains    og:{u}:dom:<identity>:<hour>   (HyperLogLog)
-- KEYS[3] user domains        og:{u}:dom:*:<hour>            (HyperLogLog)
-- KEYS[4] campaign copies     og:{u}:camp:<hour>:<fingerprint>  (hash: subject -> copies)
-- KEYS[5] next-hop answers    og:{u}:ref:<hour>      (hash: subject -> refused for good,
--                                                       subject|k -> recipients answered)
-- KEYS[6] the same, previous hour (the refused share is over a sliding hour)
-- KEYS[7] the identity's lock      og:{u}:idlock:<identity>
-- KEYS[8] the identity counts     og:{u}:idcounts   (the proxy's flusher empties it)
--         With ARGV[5] set, the script is also the identity check: a locked identity
--         returns {"locked", lock} and nothing is counted; else its message is counted in
--         KEYS[8] under ARGV[5] (what proxy/identities.py's check does on its own when
--         detection is off), so the message costs one call.
-- KEYS[9] the user's lock        og:{u}:lock
--         With ARGV[5] set, checked first: a user locked since MAIL checked it returns
--         {"locked", lock, "user"} and nothing is counted.
-- KEYS[10] optional, on a single Redis only (another slot): the identities anywhere sending
--         this content this hour, og:{camp:<fp>}:senders:<hour> (HyperLogLog); counted here
--         too, returned last. On a Cluster CAMPAIGN_LUA counts it, concurrently.
-- ARGV: see proxy/detection.py _args; then the answers the next hop gave since this process
-- last scored the user (count, then identity, answered, refused each: they ride along here
-- instead of costing a round trip of their own); then the recipient domains.

local now = tonumber(ARGV[1])
local identity = ARGV[2]
-- The message's numbers come as one argument (one to encode, not 16), in the order of
-- proxy/detection.py _numbers().
local m = {}
for v in string.gmatch(ARGV[3], "%S+") do m[#m + 1] = tonumber(v) end
local hour, rcpts, has_fp, senders = m[1], m[2], m[3] == 1, m[4]
local auth_failed, auth_new, spam = m[5] == 1, m[6] == 1, m[7] == 1
local score, spam_threshold, allowance, half_life = m[8], m[9], m[10], m[11]
local throttle_at, hold_at, lock_at, throttle_rate = m[12], m[13], m[14], m[15]
local enforce = m[16] == 1  -- enabled and not in shadow mode
-- The policy's constants are written into this source when the proxy loads it (nothing to
-- send or parse per message): scoring.risk's weights, then its constants, in the order of
-- proxy/detection.py _constants().
local c = {--[[CONSTANTS]]}
local w_volume, w_rcpts, w_spread, w_refusals = c[1], c[2], c[3], c[4]
local w_campaign, w_auth_failed, w_auth_new, w_content, w_spam = c[5], c[6], c[7], c[8], c[9]
local peak, slack_m, slack_d = c[10], c[11], c[12]
local refusal_floor, refusal_clean = c[13], c[14]
local campaign_min, boost_step, boost_cap = c[15], c[16], c[17]
local content_floor, span, ramp = c[18], c[19], c[20]
local ttl = c[21]
local refusal_prior, prior_share, bulk_cap = c[22], c[23], c[24]
local campaign_member = ARGV[4]
local identity_field = ARGV[5]
local answers = tonumber(ARGV[6])
local first_domain = 7 + 3 * answers

local state = KEYS[1]
local campaign_senders = ""
if KEYS[10] and campaign_member ~= "" then
  redis.call("PFADD", KEYS[10], campaign_member)
  redis.call("EXPIRE", KEYS[10], 7200)
  campaign_senders = tostring(redis.call("PFCOUNT", KEYS[10]))
end
local minute = math.floor(now / 60)

-- The next hop's answers to this user's earlier messages (never lost to a throttle below).
if answers > 0 then
  for i = 7, 6 + 3 * answers, 3 do
    local who, answered, refused = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    for _, s in ipairs({who, "*"}) do
      if answered > 0 then redis.call("HINCRBY", KEYS[5], s .. "|k", answered) end
      if refused > 0 then redis.call("HINCRBY", KEYS[5], s, refused) end
    end
  end
  redis.call("EXPIRE", KEYS[5], 7200)
end

-- The identity check (KEYS[9], KEYS[7], KEYS[8]): the message of a locked user or identity
-- goes no further.
if identity_field ~= "" then
  local lock = redis.call("GET", KEYS[9])
  if lock then return {"locked", lock, "user"} end
  lock = redis.call("GET", KEYS[7])
  if lock then return {"locked", lock} end
  redis.call("HINCRBY", KEYS[8], identity_field, 1)
end

local function num(field)
  return tonumber(redis.call("HGET", state, field) or "0") or 0
end

local function decayed(subject)
  local risk = num(subject .. "|r")
  local at = num(subject .. "|t")
  if risk <= 0 then return 0 end
  if now <= at then return risk end
  if half_life <= 0 then return 0 end
  return risk * math.pow(0.5, (now - at) / half_life)
end

local function rung_for(risk)
  if lock_at > 0 and risk >= lock_at then return 3 end
  if hold_at > 0 and risk >= hold_at then return 2 end
  if throttle_at > 0 and risk >= throttle_at then return 1 end
  return 0
end

-- Throttle first, from the risk before this message: a throttled message is not counted
-- (its MTA sends it again later), so retries never inflate the sender's own figures.
local before_i, before_u = decayed(identity), decayed("*")
local rung_before = math.max(rung_for(before_i), rung_for(before_u))
local minute_field = identity .. "|mm"
local minute_count = 0
if num(minute_field) == minute then minute_count = num(identity .. "|mc") end
if enforce and rung_before == 1 and throttle_rate > 0 and minute_count >= throttle_rate then
  return {"throttled", tostring(before_i), tostring(before_u), tostring(rung_before),
          tostring(rung_before), "", campaign_senders}
end
redis.call("HSET", state, minute_field, minute, identity .. "|mc", minute_count + 1)

local function expected(base, age, allow, slack)
  local own = base * peak + slack
  if age >= ramp then return own end
  local share = math.max(age, 0) / ramp
  return share * own + (1 - share) * math.max(allow, own)
end

local function excess(observed, exp)
  if exp <= 0 or observed <= exp then return 0 end
  return math.min(observed / exp - 1, 3)
end

local function baseline(mean, age_hours)
  if age_hours <= 0 then return 0 end
  local weight = 1 - math.pow(1 - 1 / span, age_hours)
  if weight <= 0 then return 0 end
  return mean / weight
end

-- The refused share over the last hour, pulled towards an unproven prior while few
-- recipients have been answered; and what it makes of the bulk points (scoring.risk).
local function answers_of(s)
  local left = 1 - (now % 3600) / 3600
  local cur = redis.call("HMGET", KEYS[5], s, s .. "|k")
  local prev = redis.call("HMGET", KEYS[6], s, s .. "|k")
  local refused = (tonumber(cur[1]) or 0) + (tonumber(prev[1]) or 0) * left
  local answered = (tonumber(cur[2]) or 0) + (tonumber(prev[2]) or 0) * left
  return (refused + refusal_prior * prior_share) / (math.max(answered, 0) + refusal_prior)
end

local function bulk_factor(share, age)
  local by_share = math.min(math.max((share - refusal_clean) / (refusal_floor - refusal_clean),
                                     0), bulk_cap)
  if by_share >= 1 then return by_share end
  local trust = math.min(math.max(age, 0) / ramp, 1)
  return 1 - trust * (1 - by_share)
end

local domains = {}
for i = first_domain, #ARGV do domains[#domains + 1] = ARGV[i] end

local out = {}
local campaign_copies = {}
if has_fp then
  campaign_copies[identity] = redis.call("HINCRBY", KEYS[4], identity, 1)
  campaign_copies["*"] = redis.call("HINCRBY", KEYS[4], "*", 1)
  redis.call("EXPIRE", KEYS[4], 7200)
end

local subjects = {{identity, KEYS[2]}, {"*", KEYS[3]}}
local new_rungs = {}
local risks = {}
local signals = {}
for _, pair in ipairs(subjects) do
  local s, hll = pair[1], pair[2]
  local h = num(s .. "|h")
  local first = redis.call("HGET", state, s .. "|f")
  if not first then
    first = hour
    redis.call("HSET", state, s .. "|f", hour)
  end
  first = tonumber(first)
  local bm, bn, bd = num(s .. "|bm"), num(s .. "|bn"), num(s .. "|bd")
  local m, n = num(s .. "|m"), num(s .. "|n")
  if h ~= hour then
    if h > 0 and hour > h then
      local gap = hour - h
      local keep = math.pow(1 - 1 / span, gap)
      local last = math.pow(1 - 1 / span, gap - 1) / span
      bm = bm * keep + last * m
      bn = bn * keep + last * n
      bd = bd * keep + last * num(s .. "|d")
    end
    m, n = 0, 0
  end
  m = m + 1
  n = n + rcpts
  if #domains > 0 then redis.call("PFADD", hll, unpack(domains)) end
  redis.call("EXPIRE", hll, 7200)
  local d = redis.call("PFCOUNT", hll)
  redis.call("HSET", state, s .. "|h", hour, s .. "|m", m, s .. "|n", n, s .. "|d", d,
             s .. "|bm", bm, s .. "|bn", bn, s .. "|bd", bd)

  local age_hours = hour - first
  local age = (now - first * 3600)
  local base_m, base_n, base_d = baseline(bm, age_hours), baseline(bn, age_hours),
    baseline(bd, age_hours)
  local bulk = {}
  local v = excess(m, expected(base_m, age, allowance, slack_m))
  if v > 0 then bulk["volume"] = w_volume * v end
  v = excess(n, expected(base_n, age, allowance * 2, slack_m * 2))
  if v > 0 then bulk["recipients"] = w_rcpts * v end
  v = excess(d, expected(base_d, age, allowance / 2, slack_d))
  if v > 0 then bulk["spread"] = w_spread * v end
  if has_fp and campaign_copies[s] > campaign_min + base_m then
    local doublings = math.log(math.max(senders, 1)) / math.log(2)
    bulk["campaign"] = w_campaign * math.min(1 + boost_step * doublings, boost_cap)
  end
  local share = answers_of(s)
  local factor = bulk_factor(share, age)
  local p = {}
  for name, value in pairs(bulk) do
    if value * factor > 0 then p[name] = value * factor end
  end
  if share > refusal_floor then p["refusals"] = w_refusals * (share - refusal_floor) end
  if auth_failed then p["auth_failed"] = w_auth_failed end
  if auth_new then p["auth_new_network"] = w_auth_new end
  if spam then
    p["spam"] = w_spam
  elseif spam_threshold > 0 then
    local share = score / spam_threshold
    if share > content_floor then p["content"] = w_content * math.min(share, 1) end
  end
  local total = 0
  local flat = {}
  for name, value in pairs(p) do
    total = total + value
    flat[#flat + 1] = name
    flat[#flat + 1] = tostring(value)
  end
  local risk = (s == identity and before_i or before_u) + total
  redis.call("HSET", state, s .. "|r", risk, s .. "|t", now)
  local previous = num(s .. "|g")
  local rung = rung_for(risk)
  redis.call("HSET", state, s .. "|g", rung)
  new_rungs[#new_rungs + 1] = previous
  new_rungs[#new_rungs + 1] = rung
  risks[#risks + 1] = tostring(risk)
  signals[#signals + 1] = table.concat(flat, " ")
end
redis.call("EXPIRE", state, ttl)
-- {"ok <identity risk> <user risk> <identity rung before, after> <user rung before,
--  after>|<identity signals>|<user signals>", the content's senders anywhere (KEYS[10], or
--  "")}: one string to read for the common case, not nine.
return {"ok " .. risks[1] .. " " .. risks[2] .. " " .. new_rungs[1] .. " " .. new_rungs[2]
        .. " " .. new_rungs[3] .. " " .. new_rungs[4] .. "|" .. signals[1] .. "|"
        .. signals[2], campaign_senders}
