"""Benchmarks: `cryptotui bench NAME --json`, each on a throwaway stack."""
