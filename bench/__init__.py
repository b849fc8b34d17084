"""Benchmarks: bench/common.py (shared helpers), bench/bench_<op>.py (one script per op, each with main(argv)),
bench/run_all.py (runs them all), bench/report.py (Markdown tables and plots from bench/results/*.json)."""
