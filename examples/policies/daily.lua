-- Today's knock: three ports from HMAC-SHA256(secret, "knockq daily " and
-- the day number, days since 1970-01-01 UTC), the first in 20000-20999, the
-- second in 21000-21999, the third in 22000-22999.
local function sequence(day)
  local a, b, c = string.unpack(">I2I2I2", knockq.hmac("knockq daily " .. day))
  return { 20000 + a % 1000, 21000 + b % 1000, 22000 + c % 1000 }
end

return function(k)
  local today = sequence(math.floor(k.wall / 86400))
  if k.port == today[k.stage + 1] then
    if k.stage + 1 < #today then
      return k.stage + 1
    end
    k:grant()
  elseif k.port == today[k.stage] then
    return k.stage               -- a retransmitted knock
  end
  return 0
end
