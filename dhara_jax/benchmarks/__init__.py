"""Benchmarks: `dhara bench generate` (generate.py: a diffusion run's samplers against its AR
run and PyTorch; torch_peers.py, quality.py, report.py), `dhara bench throughput`
(throughput.py: one run under Dhara's protocol), and what the scripts in bench/ share (timing.py,
train_step.py). Package modules are imported one by one: nothing here loads JAX for the CLI."""
