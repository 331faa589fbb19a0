-- signed.lua, plus one line of wrk's own summary at the end (for benches/tail.sh):
-- requests, p99, p99.9 and the slowest answer, in microseconds.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "signed.lua")
done = function(summary, latency, requests)
  io.write(string.format("summary requests=%d p99=%d p999=%d max=%d\n",
    summary.requests, latency:percentile(99), latency:percentile(99.9), latency.max))
end
