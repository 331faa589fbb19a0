-- wrk script: a GitLab trigger call as a urlencoded form, what `curl --data` sends.
wrk.method = "POST"
wrk.body = "token=glptt-0123456789abcdef0123&ref=main&variables[DEPLOY]=true"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"

-- PACE_MS: requests paced below every system's capacity (pace.lua, beside this script).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "pace.lua")
