-- wrk script: GET /users/<id> with a uniformly random id in 1..N, N being the first argument
-- after `--` (the number of seeded users). Each wrk thread seeds its own generator.

local threads = 0
local max_id = 10000

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  max_id = tonumber(args[1]) or max_id
  math.randomseed(os.time() * 1000 + (thread_no or 0))
end

function request()
  return wrk.format("GET", "/users/" .. math.random(1, max_id))
end
