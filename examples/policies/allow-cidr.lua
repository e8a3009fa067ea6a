-- The seed knock, for sources in ALLOWED only.
local ALLOWED = knockq.nets{ "10.9.0.2/31", "fd09::2/127" }
local SEQUENCE = { 1111, 2222 }

return function(k)
  if not ALLOWED:contains(k) then
    return 0
  end
  if k.port == 3333 then
    k:revoke()
  elseif k.port == SEQUENCE[k.stage + 1] then
    if k.stage + 1 < #SEQUENCE then
      return k.stage + 1
    end
    k:grant()
  elseif k.port == SEQUENCE[k.stage] then
    return k.stage
  end
  return 0
end
