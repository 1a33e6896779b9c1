-- AUTH's throttle in one round trip: is the client's address or the username blocked, did
-- the username succeed from the client's network recently (then only the address's block
-- applies), and, for a password already known to be right, remember the network and say
-- whether the username or the address failed AUTH within the failure window. What the
-- pipelines of proxy/throttle.py did in two round trips (check, then success), in one
-- script; the policy is scoring/locks.py's, with its numbers worked out by the caller.
-- Every key carries the {auth} hash tag: one Redis Cluster slot.
--
-- KEYS[1]  og:{auth}:blocks -- subject -> blocked until
-- KEYS[2]  og:{auth}:nets:user:<login> -- network -> last success
-- KEYS[3]  og:{auth}:fails:user:<login>
-- KEYS[4]  og:{auth}:fails:ip:<address>
-- ARGV[1]  now, float epoch seconds (injected by the caller, never Redis TIME)
-- ARGV[2]  the address's subject
-- ARGV[3]  the username's subject, "" when there is no username
-- ARGV[4]  the client's network (scoring.locks.auth_network)
-- ARGV[5]  seconds a network stays known ("0": no exemption, nothing remembered)
-- ARGV[6]  "1": the password is right; when nothing is blocked, record the success.
--          "2": the password is right and this login passed the check before it (scrypt
--          ran between): record the success whatever was blocked meanwhile
-- ARGV[7]  networks remembered before this moment are forgotten (on success)
-- ARGV[8]  networks kept per username (on success)
-- ARGV[9]  seconds the networks key lives after a success
-- ARGV[10] "1": on success, also tell whether either subject failed within the window
--
-- Returns { blocked subject or "", 1/0 known network, 1/0 success recorded,
--           1/0 failed before (on success, when asked) }.

local now = tonumber(ARGV[1])
local address, username = ARGV[2], ARGV[3]
local known_seconds = tonumber(ARGV[5])

local known = 0
if username ~= "" and known_seconds > 0 then
  local last = redis.call("ZSCORE", KEYS[2], ARGV[4])
  if last and now - tonumber(last) < known_seconds then
    known = 1
  end
end

local blocked = ""
local until_address = redis.call("ZSCORE", KEYS[1], address)
if until_address and now < tonumber(until_address) then
  blocked = address
elseif username ~= "" and known == 0 then
  local until_username = redis.call("ZSCORE", KEYS[1], username)
  if until_username and now < tonumber(until_username) then
    blocked = username
  end
end

if ARGV[6] ~= "2" and (blocked ~= "" or ARGV[6] ~= "1") then
  return { blocked, known, 0, 0 }
end

if username ~= "" and known_seconds > 0 then
  redis.call("ZADD", KEYS[2], ARGV[1], ARGV[4])
  redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", ARGV[7])
  redis.call("ZREMRANGEBYRANK", KEYS[2], 0, -(tonumber(ARGV[8]) + 1))
  redis.call("EXPIRE", KEYS[2], ARGV[9])
end

local failed = 0
if ARGV[10] == "1" and (redis.call("ZCARD", KEYS[3]) > 0 or redis.call("ZCARD", KEYS[4]) > 0) then
  failed = 1
end
return { "", known, 1, failed }
