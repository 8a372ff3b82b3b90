-- wrk script: a mix of the service's user requests, picked at random per request:
--   70% GET /users/<id>     10% GET /users?limit=20
--   10% POST /users         10% PATCH /users/<id> (a new name)
-- Arguments after `--`: N, the number of seeded users (ids 1..N), and TAG, a word unique to
-- this wrk run. A created user's email is TAG-<thread>-<counter>@example.com: unique per run,
-- thread and request, so the bench itself never causes a 409. Each thread seeds its own
-- generator and keeps its own counter (every wrk thread has a Lua state of its own).

local threads = 0
local max_id = 10000
local tag = "bench"
local counter = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  max_id = tonumber(args[1]) or max_id
  tag = args[2] or tag
  math.randomseed(os.time() * 1000 + (thread_no or 0))
end

-- wrk.format writes Host and Content-Length into the table it is given: a fresh one per request.
local function json()
  return { ["Content-Type"] = "application/json" }
end

function request()
  counter = counter + 1
  local pick = math.random(1, 100)
  if pick <= 70 then
    return wrk.format("GET", "/users/" .. math.random(1, max_id))
  elseif pick <= 80 then
    return wrk.format("GET", "/users?limit=20")
  elseif pick <= 90 then
    local who = tag .. "-" .. (thread_no or 0) .. "-" .. counter
    local body = '{"name": "bench ' .. who .. '", "email": "' .. who .. '@example.com"}'
    return wrk.format("POST", "/users", json(), body)
  else
    local body = '{"name": "renamed ' .. counter .. '"}'
    return wrk.format("PATCH", "/users/" .. math.random(1, max_id), json(), body)
  end
end
