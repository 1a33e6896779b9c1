-- AUTH's throttle in one round trip: is the client's address or the username blocked (or as
-- good as: its failures and the attempts being checked reach the limit), did
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
-- ARGV[10] "1": on success, also tell whether the address, or the username from the
--          client's network, failed within the window
-- ARGV[11] the failure limit: unless "2", a subject whose failures within the window and
--          attempts still being checked reach it refuses this AUTH as a block would ("0":
--          not counted here). So parallel guesses cannot all pass before a failure is recorded
-- ARGV[12] failures at or before this moment are outside the window
-- ARGV[13] a token: with "0" and nothing refusing, reserve a slot for this attempt until its
--          password is checked; with "2", release it ("": neither)
-- ARGV[14] reservations made at or before this moment are forgotten (a client or a process
--          gone mid-check leaks one for the window at most)
-- ARGV[15] seconds the reservations keys live
-- KEYS[5]  og:{auth}:pending:<address>
-- KEYS[6]  og:{auth}:pending:user:<login>
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

local limit = tonumber(ARGV[11])
local function full(failures, pending)
  redis.call("ZREMRANGEBYSCORE", pending, "-inf", ARGV[14])
  return redis.call("ZCOUNT", failures, "(" .. ARGV[12], "+inf")
    + redis.call("ZCARD", pending) >= limit
end
local token = ARGV[13]
if ARGV[6] == "2" then
  if token ~= "" then
    redis.call("ZREM", KEYS[5], token)
    redis.call("ZREM", KEYS[6], token)
  end
elseif blocked == "" and limit > 0 then
  if full(KEYS[4], KEYS[5]) then
    blocked = address
  elseif username ~= "" and known == 0 and full(KEYS[3], KEYS[6]) then
    blocked = username
  end
end

if ARGV[6] == "0" and blocked == "" and token ~= "" then
  redis.call("ZADD", KEYS[5], ARGV[1], token)
  redis.call("EXPIRE", KEYS[5], ARGV[15])
  if username ~= "" and known == 0 then
    redis.call("ZADD", KEYS[6], ARGV[1], token)
    redis.call("EXPIRE", KEYS[6], ARGV[15])
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

-- "Failed AUTH followed by success": a failure of this address, or of this username from
-- this network (a failure's member ends in "|" and its network), within the window. Any
-- client can fail AUTH with anyone's username: failures from elsewhere say nothing about
-- this session, and would let one customer push another up the ladder.
local failed = 0
if ARGV[10] == "1" then
  local since = "(" .. ARGV[12]
  if redis.call("ZCOUNT", KEYS[4], since, "+inf") > 0 then
    failed = 1
  elseif username ~= "" then
    local suffix = "|" .. ARGV[4]
    for _, member in ipairs(redis.call("ZRANGEBYSCORE", KEYS[3], since, "+inf")) do
      if string.sub(member, -#suffix) == suffix then
        failed = 1
        break
      end
    end
  end
end
return { "", known, 1, failed }
