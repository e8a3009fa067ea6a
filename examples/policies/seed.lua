-- The seed recipe: knock 1111 then 2222 to open the policy's ports, 3333
-- to close them; any other SYN while knocking starts over.
local SEQUENCE = { 1111, 2222 }
local CLOSE = 3333

return function(k)
  local stage = k.stage
  if k.port == CLOSE then
    k:revoke()
    return 0
  elseif k.port == SEQUENCE[stage] then
    return stage                 -- the port just knocked, again: a retransmitted SYN
  elseif k.port == SEQUENCE[stage + 1] then
    if stage + 1 < #SEQUENCE then
      return stage + 1
    end
    k:grant()
    return 0
  elseif k.port == SEQUENCE[1] then
    return 1                     -- starting over
  end
  return 0                       -- any other port resets progress
end
