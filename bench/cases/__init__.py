"""The benchmark cases; each module has ``run(bench) -> CaseResult``."""
