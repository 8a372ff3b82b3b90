-- wrk script: PATCH /users/<id> with a new name, the id uniformly random in 1..N, N being the
-- first argument after `--` (the number of seeded users). Each wrk thread seeds its own
-- generator.

local threads = 0
local max_id = 10000
local counter = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  max_id = tonumber(args[1]) or max_id
  math.randomseed(os.time() * 1000 + (thread_no or 0))
end

function request()
  counter = counter + 1
  local body = '{"name": "renamed ' .. counter .. '"}'
  -- wrk.format writes Host and Content-Length into the table it is given: a fresh one each time.
  return wrk.format(
    "PATCH", "/users/" .. math.random(1, max_id), { ["Content-Type"] = "application/json" }, body
  )
end
