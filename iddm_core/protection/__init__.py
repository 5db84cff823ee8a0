"""The protections: the user's private photos (refs, the Xc / X0 split), two-stage PGD, IDDM's Algorithm 1, and
photo protection before posting (Anti-DreamBooth ASPL / FSMG, CAP)."""
