"""S/MIME certificate values: parse, validate against a trust configuration, select for publishing.

parse (raw value -> leaf + helper certificates), trust (anchors, intermediates, CRLs, profile),
policy and chain (the rules), validate (Validator -> Verdict), verdict (per-user e-mail match),
select (at most 15 values, newest first), parallel (process pool), report (expiring soon),
reasons (the stored reason codes). Submodules are imported explicitly to keep this package light.
"""
