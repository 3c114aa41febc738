"""Benchmarks: each prints a table and writes JSON; targets are ratios against a baseline in the same run."""
