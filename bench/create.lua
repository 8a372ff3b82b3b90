-- wrk script: POST /users, a new user per request.
-- Argument after `--`: TAG, a word unique to this wrk run. A created user's email is
-- TAG-<thread>-<counter>@example.com, as in mix.lua: unique per run, thread and request, so
-- the bench itself never causes a 409.

local threads = 0
local tag = "bench"
local counter = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  tag = args[1] or tag
end

function request()
  counter = counter + 1
  local who = tag .. "-" .. (thread_no or 0) .. "-" .. counter
  local body = '{"name": "bench ' .. who .. '", "email": "' .. who .. '@example.com"}'
  -- wrk.format writes Host and Content-Length into the table it is given: a fresh one each time.
  return wrk.format("POST", "/users", { ["Content-Type"] = "application/json" }, body)
end
