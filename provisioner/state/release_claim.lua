-- ARGV: prefix, host, id.  Returns 1 if a claim was released, 0 if there was none (idempotent).
return release_claim(ARGV[1], ARGV[2], ARGV[3])
