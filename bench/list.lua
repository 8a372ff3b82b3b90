-- wrk script: GET /users?limit=20, the first page of the newest users, over and over.

function request()
  return wrk.format("GET", "/users?limit=20")
end
