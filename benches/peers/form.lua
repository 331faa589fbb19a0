-- wrk script: a GitLab trigger call as a urlencoded form, what `curl --data` sends.
wrk.method = "POST"
wrk.body = "token=glptt-0123456789abcdef0123&ref=main&variables[DEPLOY]=true"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
