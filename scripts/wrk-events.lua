-- wrk script: POST /events with ids unique across wrk threads and runs.
-- Usage: wrk ... -s scripts/wrk-events.lua URL -- RUN_PREFIX PAYLOAD_BYTES [PATH]
-- (PATH defaults to /events; /events?wait=published measures the wait.)
--
-- The request is assembled from two precomputed halves around a
-- fixed-width counter (so Content-Length never changes): wrk.format() per
-- request would make the Lua side, not the server, the bottleneck.
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local prefix = args[1] or tostring(os.time())
  local size = tonumber(args[2] or "100")
  local alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 =;-"
  local chars = {}
  for i = 1, size do
    local j = ((i - 1) * 7 + math.floor((i - 1) / 13)) % #alphabet + 1
    chars[i] = alphabet:sub(j, j)
  end
  local id_head = string.format('{"id":"%s-%d-', prefix, tid)
  local body_tail = string.format('","timestamp":1700000000,"payload":"%s"}', table.concat(chars))
  local path = args[3] or "/events"
  local length = #id_head + 12 + #body_tail
  head = "POST " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    .. "Content-Length: " .. length .. "\r\n\r\n" .. id_head
  tail = body_tail
  counter = 0
end

function request()
  counter = counter + 1
  return head .. string.format("%012d", counter) .. tail
end
