-- wrk script: a GitLab trigger call as a urlencoded form, what `curl --data` sends.
wrk.method = "POST"
wrk.body = "token=glptt-0123456789abcdef0123&ref=main&variables[DEPLOY]=true"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"

-- PACE_MS: each connection waits a random 0..2×PACE_MS between its requests, so 64
-- connections offer about 64000/PACE_MS requests a second, below every system's capacity.
local pace = tonumber(os.getenv("PACE_MS") or "0")
if pace > 0 then
  delay = function()
    return math.random(0, 2 * pace)
  end
end
