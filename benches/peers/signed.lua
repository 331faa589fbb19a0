-- wrk script: POST a signed GitHub webhook with a fresh X-GitHub-Delivery per request.
-- BODY_FILE: the payload; SIGNATURE: its "sha256=…" header; DELIVERY_PREFIX: id prefix
-- (the same prefix twice makes the second run all duplicates); DELIVERY_MAX: cycle through
-- ids 1..DELIVERY_MAX only, so a second run repeats exactly what the first one stored.
-- DELIVERY_IDS=uuid: random UUIDs instead, as GitHub, GitLab and Gitea send them (ids that
-- land all over the store's index instead of at its end).
local file = assert(io.open(os.getenv("BODY_FILE"), "rb"))
local counter = 0
local prefix = os.getenv("DELIVERY_PREFIX") or tostring(os.time())
local max = tonumber(os.getenv("DELIVERY_MAX") or "0")
local uuids = os.getenv("DELIVERY_IDS") == "uuid"
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 65536)
local function uuid()
  local r = math.random
  return string.format("%04x%04x-%04x-4%03x-%04x-%04x%04x%04x", r(0, 0xffff), r(0, 0xffff),
    r(0, 0xffff), r(0, 0xfff), r(0x8000, 0xbfff), r(0, 0xffff), r(0, 0xffff), r(0, 0xffff))
end
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-GitHub-Event"] = "push"
wrk.headers["X-Hub-Signature-256"] = os.getenv("SIGNATURE")

request = function()
  counter = counter + 1
  if max > 0 and counter > max then counter = 1 end
  if uuids then
    wrk.headers["X-GitHub-Delivery"] = uuid()
  else
    wrk.headers["X-GitHub-Delivery"] = prefix .. "-" .. counter
  end
  return wrk.format()
end

-- PACE_MS: requests paced below every system's capacity (pace.lua, beside this script).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "pace.lua")
