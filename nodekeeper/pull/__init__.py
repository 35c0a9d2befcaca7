"""The PullImage core: the pure decision, policy matching and references, and the puller
that carries out each step through the Protocols in `edges` (the only types it shares
with the adapters that implement them)."""
