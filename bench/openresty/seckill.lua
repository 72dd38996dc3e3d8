-- seckill.lua: flash-sale admission of the OpenResty-style peer in Sluice's
-- benchmark (scripts/bench): what a shop would deploy instead of Sluice.
-- Adapted from ../shared/bench/openresty-seckill (the per-IP token bucket is
-- left out: the benchmark's rate-limit phase measures nginx's limit_req).
-- Flow per order: validate X-User-Id -> local sold-out flag (no Redis) ->
-- one EVALSHA (stock check + SET NX dedup + DECRBY) on a pooled connection
-- -> winner: ngx.exec("@forward") with X-Sluice-Ticket; others: JSON answer.
local redis = require "nginx.redis" -- Debian's lua-nginx-redis == lua-resty-redis 0.27
local ngx = ngx
local re_find, re_match = ngx.re.find, ngx.re.match
local flags = ngx.shared.seckill_flags     -- sku -> true once sold out

local _M = {}
local cfg = {
  redis_host = "127.0.0.1", redis_port = 6379, timeout_ms = 1000,
  pool_size = 256, idle_ms = 60000, dedup_ttl = 3600,
}

-- KEYS[1] stock key, KEYS[2] dedup key (user+sku), ARGV[1] dedup TTL seconds.
-- Returns {1, left} = won, {0, 0} = sold out, {-1, left} = duplicate.
local SCRIPT = [[
local s = tonumber(redis.call('GET', KEYS[1]) or '0')
if s <= 0 then return {0, 0} end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return {-1, s} end
return {1, redis.call('DECRBY', KEYS[1], 1)}
]]
local sha -- cached per worker after SCRIPT LOAD

-- Rendered once, the shape and size of Sluice's default answers.
local BODY = {}
for o, msg in pairs{invalid = "invalid request", sold_out = "sold out",
                    duplicate = "already ordered", unavailable = "try again later"} do
  BODY[o] = '{"outcome":"' .. o .. '","message":"' .. msg .. '"}'
end

function _M.init(c)
  for k, v in pairs(c) do cfg[k] = v end
end

local function reply(status, outcome, body)
  body = body or BODY[outcome]
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  -- A length, not chunks: the same framing as Sluice's and nginx's answers.
  ngx.header["Content-Length"] = #body
  ngx.header["X-Sluice-Outcome"] = outcome
  ngx.print(body)
  return ngx.exit(ngx.HTTP_OK)
end

local function connect()
  local red = redis:new()
  red:set_timeout(cfg.timeout_ms)
  local ok, err = red:connect(cfg.redis_host, cfg.redis_port)
  if not ok then return nil, err end
  return red
end

local function admit(sku, uid)
  local red, err = connect()
  if not red then return nil, err end
  local k1, k2 = "sk:stock:" .. sku, "sk:dedup:" .. sku .. ":" .. uid
  local res
  if sha then res, err = red:evalsha(sha, 2, k1, k2, cfg.dedup_ttl) end
  if not res and (not sha or (err and err:find("NOSCRIPT", 1, true))) then
    sha, err = red:script("load", SCRIPT)
    if sha then res, err = red:evalsha(sha, 2, k1, k2, cfg.dedup_ttl) end
  end
  if not res then red:close(); return nil, err end
  red:set_keepalive(cfg.idle_ms, cfg.pool_size)
  return res
end

function _M.order()
  if ngx.req.get_method() ~= "POST" then return reply(405, "invalid") end
  local uid = ngx.var.http_x_user_id
  if not uid or not re_find(uid, [[^[A-Za-z0-9_.:-]{1,64}$]], "jo") then
    return reply(400, "invalid")
  end
  local sku = ngx.var.sku
  if flags:get(sku) then return reply(410, "sold_out") end

  local res, err = admit(sku, uid)
  if not res then
    ngx.log(ngx.ERR, "redis: ", err)
    return reply(503, "unavailable")
  end
  local code, left = res[1], res[2]
  if code == 1 then
    if left <= 0 then flags:set(sku, true) end
    ngx.req.set_header("X-Sluice-Ticket", ngx.var.request_id) -- 128-bit random hex
    return ngx.exec("@forward")
  elseif code == 0 then
    flags:set(sku, true)
    return reply(410, "sold_out")
  end
  return reply(409, "duplicate")
end

-- PUT /admin/v1/stock/{rule}/{sku} {"available":N}; GET reads it back.
-- The rule name is echoed but not part of the key (orders carry no rule).
function _M.admin()
  local rule, sku = ngx.var.rule, ngx.var.sku
  local method = ngx.req.get_method()
  local red, err = connect()
  if not red then return reply(503, "unavailable") end
  local n
  if method == "PUT" then
    ngx.req.read_body()
    local m = re_match(ngx.req.get_body_data() or "", [["available"\s*:\s*(\d+)]], "jo")
    if not m then return reply(400, "invalid") end
    n = tonumber(m[1])
    local ok
    ok, err = red:set("sk:stock:" .. sku, n)
    if not ok then return reply(503, "unavailable") end
    flags:delete(sku)
  elseif method == "GET" then
    n = tonumber(red:get("sk:stock:" .. sku)) or 0
  else
    return reply(405, "invalid")
  end
  red:set_keepalive(cfg.idle_ms, cfg.pool_size)
  return reply(200, "admin", string.format(
    '{"rule":"%s","sku":"%s","available":%d,"sold_out_flag":%s}',
    rule, sku, n, tostring(flags:get(sku) == true)))
end

return _M
