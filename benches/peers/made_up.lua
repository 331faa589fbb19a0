-- wrk script: gateway calls, each with a made-up project id and trigger token, as a caller
-- spraying keys at the gateway's limits sends them (the stand-in answers every one 201).
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 65536)
wrk.method = "POST"
request = function()
  local project = math.random(1, 1000000)
  local token = "glptt-" .. math.random(1, 100000000)
  return wrk.format(nil, "/api/v4/projects/" .. project .. "/trigger/pipeline?token=" .. token .. "&ref=main")
end
