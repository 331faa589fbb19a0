-- Included by the wrk scripts beside it. PACE_MS: each connection waits a random
-- 0..2×PACE_MS between its requests, so 64 connections offer about 64000/PACE_MS requests
-- a second, below every system's capacity; unset or 0, requests go back to back.
local pace = tonumber(os.getenv("PACE_MS") or "0")
if pace > 0 then
  delay = function()
    return math.random(0, 2 * pace)
  end
end
