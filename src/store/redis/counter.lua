-- meshlimit's counter script: applies one request's checks atomically inside Redis.
--
-- It mirrors src/algorithm/*.rs line for line (same integer arithmetic, same order of
-- operations), and src/store/memory.rs for what is kept: a group (one descriptor's limits)
-- is admitted or rejected whole, a lone check keeps a rejected hit when `count_rejected`,
-- and a penalty box wraps the group. Time is the caller's `now`, never Redis's clock, so
-- every replica (and every test) decides from the same instant it passed in.
--
-- Lua numbers are doubles: every value below stays exact while it is under 2^53, which
-- holds for counts times window lengths of any realistic limit (see the README's Redis
-- section for the bound). Where Rust uses u128 (the leaky bucket's drain, `elapsed × rate`
-- since an old or empty bucket), a product past 2^53 only ever exceeds the level it is
-- subtracted from, and the comparison that clamps it at zero stays exact.
--
-- KEYS, per group: [penalty key,] one key per check.
-- ARGV: now_millis, group count, then per group:
--   check count, has_penalty (0|1), [after_rejections, within_millis, block_millis, ttl],
--   then per check: algorithm (s|f|t|l|k), requests_per_unit, window_millis, burst, hits,
--   count_rejected (0|1), ttl_millis.
-- Returns three integers per check, in order: over_limit (0, 1, or 2 when the penalty box
-- answered for a blocked key), remaining, reset_after_millis; packed into one string as
-- unsigned 64-bit big-endian integers (struct.pack, a cast per number). An array of
-- integers cost meshlimit's Redis client a parsed value each (a tenth of its work with 8
-- descriptors), and numbers joined as text cost Redis a printf each.
--
-- What a call costs Redis is mostly turning strings into numbers (strtod, per tonumber)
-- and each SET: only the numbers a check uses are converted.

local floor = math.floor
local now = tonumber(ARGV[1])
local group_count = tonumber(ARGV[2])
local arg = 3
local key = 1
local out = {}

local function next_arg()
  local value = ARGV[arg]
  arg = arg + 1
  return value
end

local function next_number()
  return tonumber(next_arg())
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

-- States are written with one string.format each: a format per number, joined with `..`,
-- was the costliest part of a check.

-- State encodings: "w <window> <current> <previous>", "b <tat_micros>",
-- "l <at>:<hits> <at>:<hits> …" (sliding log, oldest first), "k <level> <updated_millis>"
-- (leaky bucket, level in hit·ms), "p <window> <rejections> <blocked_until_millis>". A value
-- of another kind (the rule's algorithm changed) starts over, as `algorithm::apply` does.
local function read_window(raw)
  if raw then
    local w, c, p = string.match(raw, '^w (%d+) (%d+) (%d+)$')
    if w then
      return { kind = 'w', window = tonumber(w), current = tonumber(c), previous = tonumber(p) }
    end
  end
  return { kind = 'w', window = 0, current = 0, previous = 0 }
end

local function read_bucket(raw)
  if raw then
    local tat = string.match(raw, '^b (%d+)$')
    if tat then
      return { kind = 'b', tat = tonumber(tat) }
    end
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
  if raw then
    local level, updated = string.match(raw, '^k (%d+) (%d+)$')
    if level then
      return { kind = 'k', level = tonumber(level), updated = tonumber(updated) }
    end
  end
  return { kind = 'k', level = 0, updated = 0 }
end

local readers = {
  s = read_window, f = read_window, t = read_bucket, l = read_log, k = read_leaky,
}
local kinds = { s = 'w', f = 'w', t = 'b', l = 'l', k = 'k' }

local function encode(state)
  if state.kind == 'w' then
    return string.format('w %d %d %d', state.window, state.current, state.previous)
  elseif state.kind == 'l' then
    local parts = { 'l' }
    for i = state.head, #state.at do
      parts[#parts + 1] = string.format('%d:%d', state.at[i], state.hits[i])
    end
    return table.concat(parts, ' ')
  elseif state.kind == 'k' then
    return string.format('k %d %d', state.level, state.updated)
  end
  return string.format('b %d', state.tat)
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

-- sliding_window::apply
local function sliding_window(state, limit, window, hits)
  roll_to(state, div_floor(now, window))
  local elapsed = now % window
  local used_scaled = state.previous * (window - elapsed) + (state.current + hits) * window
  if used_scaled > limit * window then
    local wait
    if state.current + hits <= limit then
      local free_scaled = (limit - state.current - hits) * window
      local allowed_weight = div_floor(free_scaled, math.max(state.previous, 1))
      wait = math.max((window - elapsed) - allowed_weight, 0)
    elseif hits <= limit then
      local allowed_weight = div_floor((limit - hits) * window, state.current)
      wait = (window - elapsed) + math.max(window - allowed_weight, 0)
    else
      wait = (window - elapsed) + window
    end
    return 1, 0, math.max(wait, 1)
  end
  state.current = state.current + hits
  return 0, div_floor(limit * window - used_scaled, window), window - elapsed
end

-- fixed_window::apply: a rejected hit is added only with `count_rejected` (which the store
-- passes for a lone check only), so a later check of the same key in a group sees the
-- count without it.
local function fixed_window(state, limit, window, hits, count_rejected)
  roll_to(state, div_floor(now, window))
  local after = state.current + hits
  local reset = window - now % window
  if after > limit then
    if count_rejected then
      state.current = after
    end
    return 1, 0, reset
  end
  state.current = after
  return 0, limit - state.current, reset
end

-- token_bucket::apply
local function token_bucket(state, limit, window, burst, hits)
  local now_micros = now * 1000
  if limit == 0 or burst == 0 then
    if hits > 0 then
      return 1, 0, window
    end
    return 0, 0, window
  end
  local interval = div_ceil(window * 1000, limit)
  local capacity = burst * interval
  local tat = math.max(state.tat, now_micros)
  local next_tat = tat + hits * interval
  local ahead = next_tat - now_micros
  if ahead > capacity then
    return 1, 0, math.max(div_ceil(ahead - capacity, 1000), 1)
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
      return math.max(math.max(state.at[i] + window - now, 0), 1)
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
    reset = math.max(state.at[state.head] + window - now, 0)
  end
  return 0, limit - state.total, reset
end

-- leaky_bucket::apply. `level` is in hit·ms and drains `limit` per elapsed millisecond.
local function leaky_bucket(state, limit, window, burst, hits)
  local capacity = burst * window
  local elapsed = math.max(now - state.updated, 0)
  local drained = elapsed * limit
  local level = 0
  if drained < state.level then
    level = state.level - drained
  end
  local added = hits * window
  if level + added > capacity then
    local wait
    if limit == 0 or added > capacity then
      wait = window
    else
      wait = div_ceil(level + added - capacity, limit)
    end
    return 1, 0, math.max(wait, 1)
  end
  state.level = level + added
  state.updated = math.max(now, state.updated)
  local empty_in = window
  if limit ~= 0 then
    empty_in = div_ceil(state.level, limit)
  end
  return 0, div_floor(capacity - state.level, window), empty_in
end

for _ = 1, group_count do
  local check_count = tonumber(next_arg())
  local has_penalty = next_arg() == '1'
  local penalty, penalty_key, penalty_state, penalty_ttl
  if has_penalty then
    penalty = { after = next_number(), within = next_number(), block = next_number() }
    penalty_ttl = next_arg()
    penalty_key = next_key()
    penalty_state = { window = 0, rejections = 0, blocked_until = 0 }
    local raw = redis.call('GET', penalty_key)
    if raw then
      local w, r, b = string.match(raw, '^p (%d+) (%d+) (%d+)$')
      if w then
        penalty_state = { window = tonumber(w), rejections = tonumber(r), blocked_until = tonumber(b) }
      end
    end
  end

  local first = #out + 1
  if penalty_state and penalty_state.blocked_until > now then
    -- Blocked: answered over the limit without counting (the check arguments are skipped).
    for _ = 1, check_count do
      next_key()
      arg = arg + 7
      out[#out + 1] = 2
      out[#out + 1] = 0
      out[#out + 1] = penalty_state.blocked_until - now
    end
  else
    -- One state per distinct key: a key listed twice in a group is counted twice, in order.
    local states = {}
    local touched = {}
    local ttls = {}
    local count_rejected = false
    local any_over = false
    local any_hits = false
    for _ = 1, check_count do
      -- Read in place rather than through next_arg: seven calls a check were a tenth of
      -- the script's time.
      local k = next_key()
      local algorithm = ARGV[arg]
      local limit = tonumber(ARGV[arg + 1])
      local window = tonumber(ARGV[arg + 2])
      -- Only the buckets have a burst.
      local burst = (algorithm == 't' or algorithm == 'k') and tonumber(ARGV[arg + 3]) or 0
      local hits = tonumber(ARGV[arg + 4])
      count_rejected = ARGV[arg + 5] == '1'
      local ttl = ARGV[arg + 6]
      arg = arg + 7
      if hits > 0 then
        any_hits = true
      end
      local read = readers[algorithm]
      if not read then
        return redis.error_reply('meshlimit counter script: unknown algorithm ' .. algorithm)
      end
      local state = states[k]
      if not state then
        state = read(redis.call('GET', k))
        states[k] = state
        touched[#touched + 1] = k
      elseif state.kind ~= kinds[algorithm] then
        -- The same key counted by another algorithm in this group starts over.
        state = read(nil)
        states[k] = state
      end
      ttls[k] = ttl
      local over, remaining, reset
      if algorithm == 's' then
        over, remaining, reset = sliding_window(state, limit, window, hits)
      elseif algorithm == 'f' then
        over, remaining, reset = fixed_window(state, limit, window, hits,
          count_rejected and check_count == 1)
      elseif algorithm == 't' then
        over, remaining, reset = token_bucket(state, limit, window, burst, hits)
      elseif algorithm == 'l' then
        over, remaining, reset = sliding_log(state, limit, window, hits)
      elseif algorithm == 'k' then
        over, remaining, reset = leaky_bucket(state, limit, window, burst, hits)
      else
        return redis.error_reply('meshlimit counter script: unknown algorithm ' .. algorithm)
      end
      -- A bucket's rejected hit leaves its TAT alone; a rejected window hit may still have
      -- rolled the window, which only a kept state writes back.
      if over == 1 then
        any_over = true
      end
      out[#out + 1] = over
      out[#out + 1] = remaining
      out[#out + 1] = reset
    end
    -- MemoryStore::apply_one keeps a lone check's state when admitted or count_rejected;
    -- a group of several is kept only when every check was admitted.
    local keep = not any_over or (check_count == 1 and count_rejected)
    if keep then
      for _, k in ipairs(touched) do
        redis.call('SET', k, encode(states[k]), 'PX', ttls[k])
      end
    end
    -- A zero-hit check (a usage query) only looks; it never earns a penalty.
    if penalty and any_over and any_hits then
      local window = div_floor(now, math.max(penalty.within, 1))
      if window ~= penalty_state.window then
        penalty_state.window = window
        penalty_state.rejections = 0
      end
      penalty_state.rejections = math.min(penalty_state.rejections + 1, 4294967295)
      if penalty_state.rejections >= penalty.after then
        penalty_state.rejections = 0
        penalty_state.blocked_until = now + penalty.block
        for i = first, #out, 3 do
          if out[i] == 1 then
            out[i + 2] = penalty.block
          end
        end
      end
      redis.call('SET', penalty_key,
        string.format('p %d %d %d', penalty_state.window, penalty_state.rejections,
          penalty_state.blocked_until), 'PX', penalty_ttl)
    end
  end
end

local packed = {}
for first = 1, #out, 48 do
  local last = math.min(first + 47, #out)
  packed[#packed + 1] = struct.pack('>' .. string.rep('I8', last - first + 1), unpack(out, first, last))
end
return table.concat(packed)
