"""The schema, applied in file order by `certsync db upgrade` (shipped inside the certsync package)."""
