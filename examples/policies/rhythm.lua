-- Knock 1111, 2222, 3333, each 1 to 3 seconds after the one before.
local SEQUENCE = { 1111, 2222, 3333 }
local MIN_GAP, MAX_GAP = 1, 3

return function(k)
  local stage = k.stage
  if k.port == SEQUENCE[stage] and k.now - k.last < MIN_GAP then
    return stage                 -- a retransmitted SYN of the last knock
  end
  if stage > 0 and k.port == SEQUENCE[stage + 1] then
    local gap = k.now - k.last
    if gap < MIN_GAP or gap > MAX_GAP then
      return 0
    end
    if stage + 1 == #SEQUENCE then
      k:grant()
      return 0
    end
    return stage + 1
  end
  if k.port == SEQUENCE[1] then
    return 1
  end
  return 0
end
