-- Knock 1111 then 2222 to open, 3333 to close, but only during office
-- hours: Monday to Friday, 08:00 to 19:00 at UTC+1.
local UTC_OFFSET_HOURS = 1
local SEQUENCE = { 1111, 2222 }
local CLOSE = 3333

local function office_hours(wall)
  local local_time = wall + UTC_OFFSET_HOURS * 3600
  local day = math.floor(local_time / 86400)
  local weekday = (day + 3) % 7            -- 0 = Monday (1970-01-01 was a Thursday)
  local hour = math.floor(local_time % 86400 / 3600)
  return weekday < 5 and hour >= 8 and hour < 19
end

return function(k)
  if k.port == CLOSE then
    k:revoke()
    return 0
  end
  if not office_hours(k.wall) then
    return 0
  end
  if k.port == SEQUENCE[k.stage + 1] then
    if k.stage + 1 < #SEQUENCE then
      return k.stage + 1
    end
    k:grant()
  end
  return 0
end
