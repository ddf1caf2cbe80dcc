-- meshlimit's counter script: applies the checks of one request, or of several requests
-- in turn, atomically inside Redis.
--
-- It mirrors src/algorithm/*.rs line for line (same integer arithmetic, same order of
-- operations), and src/store/memory.rs for what is kept: a group (one descriptor's limits)
-- is admitted or rejected whole unless every check of it counts rejected hits
-- (`count_rejected`), and a penalty box wraps the group. Time is the caller's `now`, never Redis's clock, so
-- every replica (and every test) decides from the same instant it passed in.
--
-- Lua numbers are doubles: every value below stays exact while it is under 2^53, which
-- holds for counts times window lengths of any realistic limit (see the README's Redis
-- section for the bound). Where Rust uses u128 (the leaky bucket's drain, `elapsed × rate`
-- since an old or empty bucket), a product past 2^53 only ever exceeds the level it is
-- subtracted from, and the comparison that clamps it at zero stays exact.
--
-- KEYS, per request, per group: [penalty key,] one key per check.
-- ARGV: one argument per request (meshlimit sends the requests waiting for the same
-- server in one call), each unsigned 64-bit big-endian integers unpacked at once (decimal
-- arguments cost Redis an argument object and a strtod each, a third of the script's cost):
--   now_millis, group count, then per group:
--   check count × 2 + has_penalty, [after_rejections, within_millis, block_millis, ttl],
--   then per check: algorithm × 2 + count_rejected (algorithm 1 sliding window, 2 fixed
--   window, 3 token bucket, 4 sliding log, 5 leaky bucket, 6 fixed window on a calendar),
--   requests_per_unit, window_millis (6: the window's number), hits, ttl_millis, and for
--   the buckets (3, 5) burst, for 6 the milliseconds until the window ends. Unpacking costs
--   ~600 instructions a number, so no number is sent that a check does not use.
-- Returns three integers per check, in order: over_limit (0, 1, or 2 when the penalty box
-- answered for a blocked key), remaining, reset_after_millis; packed into one string as
-- unsigned 64-bit big-endian integers (struct.pack, a cast per number). An array of
-- integers cost meshlimit's Redis client a parsed value each (a tenth of its work with 8
-- descriptors), and numbers joined as text cost Redis a printf each.
--
-- What a call costs Redis is mostly each SET and reading the states.

-- Library functions as locals: a global is two table lookups on every use.
local floor, max, min = math.floor, math.max, math.min
local byte, rep, format = string.byte, string.rep, string.format
local pack, unpack_struct = struct.pack, struct.unpack

-- struct.unpack returns its numbers on Lua's C stack, which holds 8 000: a request with
-- more numbers than a chunk is unpacked chunk by chunk.
local CHUNK = 4000
-- The format for each count of numbers, made once a call: a call's requests are mostly of
-- one size.
local layouts = {}
local function unpack_numbers(blob)
  local count = #blob / 8
  if count <= CHUNK then
    local layout = layouts[count]
    if not layout then
      layout = '>' .. rep('I8', count)
      layouts[count] = layout
    end
    return { unpack_struct(layout, blob) }
  end
  local numbers = {}
  local at = 1
  while count > 0 do
    local n = min(count, CHUNK)
    local chunk = { unpack_struct('>' .. rep('I8', n), blob, at) }
    for i = 1, n do
      numbers[#numbers + 1] = chunk[i]
    end
    at = chunk[n + 1]
    count = count - n
  end
  return numbers
end

-- The request being applied: its numbers, its time, and the next number to read. KEYS
-- are every request's keys in order, so `key` runs on across requests.
local numbers, now, arg
local key = 1
local out = {}

local function next_number()
  local value = numbers[arg]
  arg = arg + 1
  return value
end

-- A TTL as text, once per distinct value a call: Redis turns a number argument into text
-- with a printf, and a request's checks mostly share a few windows.
local ttl_texts = {}
local function ttl_text(ttl)
  local text = ttl_texts[ttl]
  if not text then
    text = format('%d', ttl)
    ttl_texts[ttl] = text
  end
  return text
end

local function next_key()
  local value = KEYS[key]
  key = key + 1
  return value
end

-- Exact while a and b are integers below 2^53.
local function div_floor(a, b)
  return floor(a / b)
end

local function div_ceil(a, b)
  return floor((a + b - 1) / b)
end

-- State encodings: a kind byte, then unsigned 64-bit big-endian integers: "w" window,
-- current, previous (the window algorithms); "b" tat_micros (token bucket); "k" level
-- (hit·ms), updated_millis (leaky bucket); "p" window, rejections, blocked_until_millis
-- (penalty). Binary, because reading text cost a pattern match and a strtod per number,
-- and writing it a printf per number. The sliding log stays text, "l <at>:<hits> …"
-- (oldest first): its length varies with the limit. A value of another kind (the rule's
-- algorithm changed) starts over, as `algorithm::apply` does.
local WINDOW, BUCKET, LEAKY, PENALTY = 119, 98, 107, 112 -- w, b, k, p

local function read_window(raw)
  if raw and #raw == 25 and byte(raw) == WINDOW then
    local _, w, c, p = unpack_struct('>BI8I8I8', raw)
    return { kind = 'w', window = w, current = c, previous = p, stored = w }
  end
  return { kind = 'w', window = 0, current = 0, previous = 0 }
end

local function read_bucket(raw)
  if raw and #raw == 9 and byte(raw) == BUCKET then
    local _, tat = unpack_struct('>BI8', raw)
    return { kind = 'b', tat = tat }
  end
  return { kind = 'b', tat = 0 }
end

-- The log is kept as a list with a moving head, so dropping the oldest entries is O(1).
local function read_log(raw)
  local state = { kind = 'l', at = {}, hits = {}, head = 1, total = 0 }
  if raw and string.sub(raw, 1, 2) == 'l ' then
    for at, n in string.gmatch(raw, '(%d+):(%d+)') do
      state.at[#state.at + 1] = tonumber(at)
      state.hits[#state.hits + 1] = tonumber(n)
      state.total = state.total + tonumber(n)
    end
  end
  return state
end

local function read_leaky(raw)
  if raw and #raw == 17 and byte(raw) == LEAKY then
    local _, level, updated = unpack_struct('>BI8I8', raw)
    return { kind = 'k', level = level, updated = updated }
  end
  return { kind = 'k', level = 0, updated = 0 }
end

-- Indexed by the algorithm's code.
local readers = { read_window, read_window, read_bucket, read_log, read_leaky, read_window }
local kinds = { 'w', 'w', 'b', 'l', 'k', 'w' }

-- A working copy of a state, so a group that is rejected leaves the call's state as it
-- was (its changes are dropped, as a rejected group's are never written).
-- Built field by field in one constructor: a table filled by a `pairs` loop grew (and
-- rehashed) three times on the way to five fields, a tenth of a check's cost.
local function copy(state)
  local kind = state.kind
  if kind == 'w' then
    return { kind = 'w', window = state.window, current = state.current,
      previous = state.previous, stored = state.stored }
  elseif kind == 'b' then
    return { kind = 'b', tat = state.tat }
  elseif kind == 'k' then
    return { kind = 'k', level = state.level, updated = state.updated }
  end
  -- The sliding log ('l'). A loop, not unpack: a log can hold more entries than Lua's stack.
  local at, hits = {}, {}
  for i = 1, #state.at do
    at[i] = state.at[i]
    hits[i] = state.hits[i]
  end
  return { kind = 'l', at = at, hits = hits, head = state.head, total = state.total }
end

local function encode(state)
  if state.kind == 'w' then
    return pack('>BI8I8I8', WINDOW, state.window, state.current, state.previous)
  elseif state.kind == 'l' then
    local parts = { 'l' }
    for i = state.head, #state.at do
      parts[#parts + 1] = format('%d:%d', state.at[i], state.hits[i])
    end
    return table.concat(parts, ' ')
  elseif state.kind == 'k' then
    return pack('>BI8I8', LEAKY, state.level, state.updated)
  end
  return pack('>BI8', BUCKET, state.tat)
end

-- WindowState::roll_to
local function roll_to(state, window)
  if state.window == window then
    return
  end
  if window == state.window + 1 then
    state.previous = state.current
  else
    state.previous = 0
  end
  state.current = 0
  state.window = window
end

-- sliding_window::wait_until_admitted
local function sliding_wait(state, limit, window, hits, elapsed)
  local wait
  if state.current + hits <= limit then
    local free_scaled = (limit - state.current - hits) * window
    local allowed_weight = div_floor(free_scaled, max(state.previous, 1))
    wait = max((window - elapsed) - allowed_weight, 0)
  elseif hits <= limit then
    local allowed_weight = div_floor((limit - hits) * window, state.current)
    wait = (window - elapsed) + max(window - allowed_weight, 0)
  else
    wait = (window - elapsed) + window
  end
  return max(wait, 1)
end

-- sliding_window::apply, and with `count_rejected` apply_counting_rejected
local function sliding_window(state, limit, window, hits, count_rejected)
  local elapsed = now % window
  local current = (now - elapsed) / window
  if state.window ~= current then
    roll_to(state, current)
  end
  local used_scaled = state.previous * (window - elapsed) + (state.current + hits) * window
  if used_scaled > limit * window then
    if count_rejected then
      state.current = state.current + hits
    end
    return 1, 0, sliding_wait(state, limit, window, hits, elapsed)
  end
  state.current = state.current + hits
  local spare = limit * window - used_scaled
  local remaining = (spare - spare % window) / window
  if remaining == 0 then
    return 0, 0, sliding_wait(state, limit, window, 1, elapsed)
  end
  return 0, remaining, window - elapsed
end

-- fixed_window::apply: a rejected hit is added only with `count_rejected`. A calendar
-- window (6) comes with its number and reset, which Rust found in the zone's rules.
local function count_in_window(state, limit, current, reset, hits, count_rejected)
  if state.window ~= current then
    roll_to(state, current)
  end
  local after = state.current + hits
  if after > limit then
    if count_rejected then
      state.current = after
    end
    return 1, 0, reset
  end
  state.current = after
  return 0, limit - state.current, reset
end

local function fixed_window(state, limit, window, hits, count_rejected)
  local into = now % window
  return count_in_window(state, limit, (now - into) / window, window - into, hits, count_rejected)
end

-- token_bucket::apply: with `count_rejected` a charge that does not fit is taken as debt,
-- at most a window beyond an empty bucket.
local function token_bucket(state, limit, window, burst, hits, count_rejected)
  local now_micros = now * 1000
  if limit == 0 or burst == 0 then
    if hits > 0 then
      return 1, 0, window
    end
    return 0, 0, window
  end
  local interval = div_ceil(window * 1000, limit)
  local capacity = burst * interval
  local tat = max(state.tat, now_micros)
  local cost = hits * interval
  local next_tat = tat + cost
  local ahead = next_tat - now_micros
  if ahead > capacity then
    local wait = ahead - capacity
    if count_rejected and hits > 0 then
      local owed = max(min(next_tat, now_micros + capacity + window * 1000), tat)
      state.tat = owed
      wait = max(owed + cost - now_micros - capacity, 0)
    end
    return 1, 0, max(div_ceil(wait, 1000), 1)
  end
  state.tat = next_tat
  return 0, div_floor(capacity - ahead, interval), div_ceil(ahead, 1000)
end

-- sliding_log::wait_until_room
local function wait_until_room(state, limit, window, hits)
  if hits > limit then
    return window
  end
  local to_free = state.total + hits - limit
  for i = state.head, #state.at do
    local n = state.hits[i]
    if n >= to_free then
      return max(max(state.at[i] + window - now, 0), 1)
    end
    to_free = to_free - n
  end
  return window
end

-- sliding_log::apply
local function sliding_log(state, limit, window, hits)
  -- Hits at or before now − W have left the window.
  while state.head <= #state.at do
    if state.at[state.head] + window > now then
      break
    end
    state.total = state.total - state.hits[state.head]
    state.head = state.head + 1
  end
  if state.total + hits > limit then
    return 1, 0, wait_until_room(state, limit, window, hits)
  end
  if hits > 0 then
    state.at[#state.at + 1] = now
    state.hits[#state.hits + 1] = hits
    state.total = state.total + hits
  end
  -- When the oldest admitted hit leaves the window and frees room.
  local reset = window
  if state.head <= #state.at then
    reset = max(state.at[state.head] + window - now, 0)
  end
  return 0, limit - state.total, reset
end

-- leaky_bucket::apply. `level` is in hit·ms and drains `limit` per elapsed millisecond;
-- with `count_rejected` a charge that does not fit overfills it, by at most a window's drain.
local function leaky_bucket(state, limit, window, burst, hits, count_rejected)
  local capacity = burst * window
  local elapsed = max(now - state.updated, 0)
  local drained = elapsed * limit
  local level = 0
  if drained < state.level then
    level = state.level - drained
  end
  local added = hits * window
  if level + added > capacity then
    local over = level
    if count_rejected and hits > 0 then
      over = max(min(level + added, capacity + limit * window), level)
      state.level = over
      state.updated = max(now, state.updated)
    end
    local wait
    if limit == 0 or added > capacity then
      wait = window
    else
      wait = div_ceil(over + added - capacity, limit)
    end
    return 1, 0, max(wait, 1)
  end
  state.level = level + added
  state.updated = max(now, state.updated)
  local empty_in = window
  if limit ~= 0 then
    empty_in = div_ceil(state.level, limit)
  end
  return 0, div_floor(capacity - state.level, window), empty_in
end

-- Every counter key the call has touched: its state as the call has left it so far, and
-- the TTL of its last kept write. Until a group keeps a state for it, a key holds the value
-- GET returned (false when there was none), parsed by each group that uses it: parsing
-- gives the group its own working copy without copying. The requests of a call often
-- share keys (a busy client's), and each GET and SET costs Redis more than the
-- arithmetic: a key is read once and written once a call, with its final state.
local call_states = {}
local call_keys = {}
local call_ttls = {}

-- A group's working states, TTLs and keys in order, emptied after each group rather than
-- made anew: three tables a group were a fifth of what a one-check group cost.
local states = {}
local ttls = {}
local touched = {}
local touched_count = 0
-- How many numbers `out` holds (`#out` is a search each time).
local out_count = 0

-- One request after another; each one's groups in order.
for request = 1, #ARGV do
  numbers = unpack_numbers(ARGV[request])
  now = numbers[1]
  local group_count = numbers[2]
  arg = 3
  for _ = 1, group_count do
    -- Halved by arithmetic, not floor(): a C call costs more than the rest of a step.
    local header = numbers[arg]
    arg = arg + 1
    local penalty_bit = header % 2
    local check_count = (header - penalty_bit) / 2
    local has_penalty = penalty_bit == 1
    local penalty, penalty_key, penalty_state, penalty_ttl
    if has_penalty then
      penalty = { after = next_number(), within = next_number(), block = next_number() }
      penalty_ttl = next_number()
      penalty_key = next_key()
      penalty_state = { window = 0, rejections = 0, blocked_until = 0 }
      local raw = redis.call('GET', penalty_key)
      if raw and #raw == 25 and byte(raw) == PENALTY then
        local _, w, r, b = unpack_struct('>BI8I8I8', raw)
        penalty_state = { window = w, rejections = r, blocked_until = b }
      end
    end

    local first = out_count + 1
    if penalty_state and penalty_state.blocked_until > now then
      -- Blocked: answered over the limit without counting (the check arguments are skipped).
      for _ = 1, check_count do
        next_key()
        local code = numbers[arg]
        local algorithm = (code - code % 2) / 2
        arg = arg + ((algorithm >= 5 or algorithm == 3) and 6 or 5)
        out[out_count + 1] = 2
        out[out_count + 2] = 0
        out[out_count + 3] = penalty_state.blocked_until - now
        out_count = out_count + 3
      end
    else
      -- One state per distinct key: a key listed twice in a group is counted twice, in order.
      local all_count_rejected = true
      local any_over = false
      local any_hits = false
      for _ = 1, check_count do
        -- Read in place rather than through next_number: a call a number was a tenth
        -- of the script's time.
        local k = KEYS[key]
        key = key + 1
        local code = numbers[arg]
        local rejected_bit = code % 2
        local algorithm = (code - rejected_bit) / 2
        local count_rejected = rejected_bit == 1
        if not count_rejected then
          all_count_rejected = false
        end
        local limit = numbers[arg + 1]
        local window = numbers[arg + 2]
        local hits = numbers[arg + 3]
        local ttl = numbers[arg + 4]
        -- The buckets' burst, or a calendar window's reset.
        local burst = 0
        if algorithm >= 5 or algorithm == 3 then
          burst = numbers[arg + 5]
          arg = arg + 6
        else
          arg = arg + 5
        end
        if hits > 0 then
          any_hits = true
        end
        local read = readers[algorithm]
        if not read then
          return redis.error_reply('meshlimit counter script: unknown algorithm code ' .. algorithm)
        end
        local state = states[k]
        if not state then
          local known = call_states[k]
          if known == nil then
            known = redis.call('GET', k) or false
            call_states[k] = known
            call_keys[#call_keys + 1] = k
          end
          if type(known) ~= 'table' then
            -- A value of another kind (the rule's algorithm changed) reads as a new state.
            state = read(known)
          elseif known.kind == kinds[algorithm] then
            state = copy(known)
          else
            state = read(nil)
          end
          states[k] = state
          touched_count = touched_count + 1
          touched[touched_count] = k
        elseif state.kind ~= kinds[algorithm] then
          -- The same key counted by another algorithm in this group starts over.
          state = read(nil)
          states[k] = state
        end
        ttls[k] = ttl
        local over, remaining, reset
        if algorithm == 1 then
          over, remaining, reset = sliding_window(state, limit, window, hits, count_rejected)
        elseif algorithm == 2 then
          over, remaining, reset = fixed_window(state, limit, window, hits, count_rejected)
        elseif algorithm == 3 then
          over, remaining, reset = token_bucket(state, limit, window, burst, hits, count_rejected)
        elseif algorithm == 4 then
          over, remaining, reset = sliding_log(state, limit, window, hits)
        elseif algorithm == 6 then
          over, remaining, reset = count_in_window(state, limit, window, burst, hits, count_rejected)
        else
          over, remaining, reset = leaky_bucket(state, limit, window, burst, hits, count_rejected)
        end
        -- A bucket's rejected hit leaves it alone (unless it is taken as debt); a
        -- rejected window hit may still have rolled the window, which only a kept state
        -- writes back.
        if over == 1 then
          any_over = true
        end
        out[out_count + 1] = over
        out[out_count + 2] = remaining
        out[out_count + 3] = reset
        out_count = out_count + 3
      end
      -- MemoryStore::apply_limits keeps a group's states when every check was admitted, or
      -- when every check counts rejected hits.
      local keep = not any_over or all_count_rejected
      if keep then
        for i = 1, touched_count do
          local k = touched[i]
          call_states[k] = states[k]
          call_ttls[k] = ttls[k]
        end
      end
      for i = 1, touched_count do
        local k = touched[i]
        states[k] = nil
        ttls[k] = nil
        touched[i] = nil
      end
      touched_count = 0
      -- A zero-hit check (a usage query) only looks; it never earns a penalty.
      if penalty and any_over and any_hits then
        local window = div_floor(now, max(penalty.within, 1))
        if window ~= penalty_state.window then
          penalty_state.window = window
          penalty_state.rejections = 0
        end
        penalty_state.rejections = min(penalty_state.rejections + 1, 4294967295)
        local ttl = penalty_ttl
        if penalty_state.rejections >= penalty.after then
          -- PenaltyState::record_rejection: the block lasts until the limit itself would
          -- let the key in, if that is later.
          local block = penalty.block
          for i = first, out_count, 3 do
            if out[i] == 1 then
              block = max(block, out[i + 2])
            end
          end
          penalty_state.rejections = 0
          penalty_state.blocked_until = now + block
          ttl = max(ttl, block)
          for i = first, out_count, 3 do
            if out[i] == 1 then
              out[i + 2] = block
            end
          end
        end
        redis.call('SET', penalty_key,
          pack('>BI8I8I8', PENALTY, penalty_state.window, penalty_state.rejections,
            penalty_state.blocked_until), 'PX', ttl_text(ttl))
      end
    end
  end
end

-- Each kept state, written once. A window state still in the window it was stored in keeps
-- its TTL: the first write of a window set one that outlasts the window's relevance, and
-- setting an expiry costs Redis more than the rest of the SET (it also rewrites the command
-- as PXAT for replication).
for _, k in ipairs(call_keys) do
  local ttl = call_ttls[k]
  if ttl then
    local state = call_states[k]
    if state.stored ~= nil and state.stored == state.window then
      redis.call('SET', k, encode(state), 'KEEPTTL')
    else
      redis.call('SET', k, encode(state), 'PX', ttl_text(ttl))
    end
  end
end

local packed = {}
for first = 1, out_count, 48 do
  local last = min(first + 47, out_count)
  packed[#packed + 1] = pack('>' .. rep('I8', last - first + 1), unpack(out, first, last))
end
return table.concat(packed)
