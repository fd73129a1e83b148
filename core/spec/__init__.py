"""Speculative decoding: draft proposers and the verification (acceptance) maths."""
