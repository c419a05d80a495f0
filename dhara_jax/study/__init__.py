"""`dhara study`: the study behind Dhara-70M as one resumable command — a grid of cells
(spec.py), each trained, converted, evaluated and timed in its own processes (runner.py), its
results gathered from the files they write (results.py) into tables and plots (render.py,
plots.py) beside codelion's published numbers (published.py)."""
