return function(k)
  if k.port == 1111 then
    return k.stage +
  end
end
