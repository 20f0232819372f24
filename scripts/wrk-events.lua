-- wrk script: POST /events with ids unique across wrk threads and runs.
-- Usage: wrk ... -s scripts/wrk-events.lua URL -- RUN_PREFIX PAYLOAD_BYTES
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or tostring(os.time())
  local size = tonumber(args[2] or "100")
  local alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 =;-"
  local chars = {}
  for i = 1, size do
    local j = ((i - 1) * 7 + math.floor((i - 1) / 13)) % #alphabet + 1
    chars[i] = alphabet:sub(j, j)
  end
  payload = table.concat(chars)
  counter = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  counter = counter + 1
  local body = string.format('{"id":"%s-%d-%d","timestamp":1700000000,"payload":"%s"}',
    prefix, tid, counter, payload)
  return wrk.format("POST", "/events", headers, body)
end
